"""Placeholder: upstream server fixtures (the lead overwrites this file)."""
