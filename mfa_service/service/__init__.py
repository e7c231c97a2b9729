"""The rules: what each RPC means, in one transaction per call, for every factor method."""
