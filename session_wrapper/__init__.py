"""The ForceCommand session wrapper (issue 3): shell.py is what sshd runs; session.py tells an
interactive session (pty_relay.py: recorded through a pty of its own) from a command
(passthrough.py: passed through byte for byte, logged as an exec event), and agent_client.py
speaks to the agent. Every session of every user imports this, so it imports nothing."""
