"""`sshtrail-shell`: sshd's ForceCommand, the file sshd runs for every session (the session itself:
session_wrapper.session). Kept this small because Python compiles the file it is started with
on every start, caching nothing: the whole wrapper compiled here cost each session ~1.2 ms."""
import os
import sys


def command(python: str, config_path: str | None) -> list[str]:
    """The ForceCommand argv: isolated, without site (see session_wrapper.session)."""
    argv = [python, "-I", "-S", os.path.abspath(__file__)]
    return argv + (["--config", os.path.abspath(config_path)] if config_path else [])


if __name__ == "__main__":
    # -I leaves our code's root off sys.path: it is the parent of this folder.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from session_wrapper.session import main
    main()
