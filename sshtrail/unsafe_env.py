"""Environment variables that run code in a process before it runs its own: the dynamic
loader's that load code or write files (from glibc's list of variables it ignores for setuid
programs), and the shell's startup files. Only those an empty value disarms: some others act
on being set at all (an empty LD_SHOW_AUXV still prints), and they run no code. A user can put any of them into their session's environment through pam_env's
user_readenv (~/.pam_environment, on by default in Debian's sshd PAM service), and sshd starts
the ForceCommand in that environment: LD_PRELOAD there would run the user's code inside the
session wrapper. `sshtrail install` has sshd blank them (SetEnv NAME=, which overrides the PAM
environment); the wrapper removes the blanks before it starts the user's program."""

NAMES = (
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_PROFILE", "LD_DEBUG", "LD_DEBUG_OUTPUT",
    "GCONV_PATH", "GLIBC_TUNABLES", "MALLOC_TRACE", "BASH_ENV", "ENV",
)

# sshd runs the ForceCommand through the user's login shell (`shell -c wrapper`), and some
# shells first run startup files of the user's own: code outside the recording, which can
# simply never start the wrapper (`exec bash` in ~/.bashrc is an unrecorded session). sshd sets
# these for the ForceCommand, overriding what the user's environment says, so that they do not;
# the wrapper removes them before it starts the user's program, whose shell then starts as
# without sshtrail.
# - SHLVL: Debian's bash (built with SSH_SOURCE_BASHRC) reads ~/.bashrc for `bash -c` when it
#   sees SSH_CLIENT, but only as a top-level shell, which SHLVL=1 says it is not.
# - ZDOTDIR: zsh reads $ZDOTDIR/.zshenv (ZDOTDIR defaults to $HOME) for every shell, `-c`
#   included; /nonexistent is where nobody's home is, and nothing can be created there.
# csh, tcsh, fish and tmux read the user's files for `-c` whatever the environment says:
# `sshtrail doctor` names the accounts that have them as login shell.
SHELL_SETTINGS = {"SHLVL": "1", "ZDOTDIR": "/nonexistent"}


def sshd_setenv() -> str:
    """The value of the SetEnv line `sshtrail install` writes."""
    return " ".join([f"{n}=" for n in NAMES] + [f"{n}={v}" for n, v in SHELL_SETTINGS.items()])


def remove_ours(environ) -> None:
    """Undo sshd's SetEnv in the wrapper's environment, before the user's program starts."""
    for name in NAMES:
        if environ.get(name) == "":  # blanked by sshd for us: not the user's
            del environ[name]
    for name in SHELL_SETTINGS:
        environ.pop(name, None)  # SetEnv overrides the user's: whatever is here is ours
