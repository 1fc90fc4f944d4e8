#!/bin/sh
# What pam_exec.so runs in fail-open mode: start the hook in a session of its own and return at
# once, so a login never waits for the recording of it (pam_exec waits only for this process).
# Usage: detach.sh PYTHON ARGS...   (the hook's own command line)
#
# What the hook needs of the moment of the call is taken here, before detaching, with the
# shell's own builtins (no exec on the login's path): the caller ($PPID, sshd) and its start
# time (/proc/PID/stat field 22: the session id is derived from it, and a short session's sshd
# is gone by the time the hook runs), and the time of the call (/proc/uptime: the detached hooks
# of one login start in any order, and an attempt stamped after the session that granted it
# would be reported as refused).
#
# The hook starts DEFER seconds later, once the login it records is under way: a Python start
# and its write (~25 ms of CPU, three a login) competed with the login itself for the CPU
# (bench/pty: setup +38 ms with the hook at once, +21 with it deferred or not run at all).
# Meanwhile it ignores SIGTERM, as the hook then does: a shutdown's TERM must not lose a call
# that has been made (the hook ends by itself within pam.timeout).
# nice: the recording competes with the logins that follow; let them win. (Not SCHED_IDLE:
# under sustained load it could starve past pam.timeout and lose the event.)
# Every program by its full path: this runs as root in the PAM environment, where the user's
# ~/.pam_environment may have put a PATH of theirs (tests/test_pam_hook.py).
DEFER=0.3
caller=$PPID
read uptime _ < /proc/uptime
fields() { set -- $1; caller_start=${20}; }
read -r stat < "/proc/$caller/stat" && fields "${stat##*) }"
exec /usr/bin/setsid -f /bin/sh -c 'trap "" TERM; /bin/sleep "$0"; exec /usr/bin/nice -n 10 "$@"' \
    "$DEFER" "$@" --caller "$caller" --caller-start "$caller_start" --called-at-uptime "$uptime"
