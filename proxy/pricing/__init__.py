"""The exact price of a call: the dated price table, and the worst case a call may cost before it goes out."""
