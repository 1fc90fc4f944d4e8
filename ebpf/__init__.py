"""BCC tracepoint probes for per-session host events (issue 4). Not built yet."""
