"""The ledger's durability: the writer that takes usage records in, the one commit, and records on disk."""
