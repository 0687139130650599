"""cednet-pl."""
