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
