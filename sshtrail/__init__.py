"""sshtrail's shared core: event model, config, spool, and the entry points that wire the parts.

Core modules (events, config, spool, ...) import no component; only the entry points (cli,
agent) import pam_module, session_wrapper, ebpf or collector.
"""
__version__ = "0.1.0"
