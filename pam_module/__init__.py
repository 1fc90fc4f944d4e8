"""The login trail: the hook `pam_exec.so` runs in sshd's PAM stacks, and the watcher of sshd's
own log for the refusals PAM never sees. Runs as root; trusts nothing in the PAM environment."""
