"""BCC tracepoint probes for per-session host events: execs, file opens, connects (tracer.py,
probes.c, decode.py). Used by the agent only (sshtrail.host_events)."""
