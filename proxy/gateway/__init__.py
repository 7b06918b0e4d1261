"""The request path, in the order a call meets it: routes → gate → relay → meters, and one record per call."""
