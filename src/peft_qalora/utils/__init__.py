"""Helpers that import nothing of ours: the one atomic writer, quieting library chatter."""
