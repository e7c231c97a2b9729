"""One module per factor method, all behind the small protocol in ``base``."""
