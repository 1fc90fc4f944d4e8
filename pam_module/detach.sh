#!/bin/sh
# What pam_exec.so runs in fail-open mode: hand the call over and return at once, so a login
# never waits for the recording of it (pam_exec waits only for this process).
# Usage: detach.sh [--queue DIR] PYTHON ARGS...   (the hook's own command line)
#
# What the hook needs of the moment of the call is taken here, before anything else, with the
# shell's own builtins (no exec on the login's path): the caller ($PPID, sshd) and its start
# time (/proc/PID/stat field 22: the session id is derived from it, and a short session's sshd
# is gone by the time the call is written), and the time of the call (/proc/uptime: the calls
# of one login are written in any order, and an attempt stamped after the session that granted
# it would be reported as refused).
#
# With --queue, while the agent that drains DIR runs (DIR/agent: its pid and start time), the
# call becomes a file there, written by builtins alone (pam_module/queue.py reads it), and no
# process of ours outlives this one: a Python start per PAM call cost ~25 ms of CPU, three or
# four a login, on the cores the session runs on (bench/pty, bench/login). Without a live
# agent, or if the file cannot be written, the hook itself is started:
#
# it starts DEFER seconds later, once the login it records is under way: a Python start and its
# write (~25 ms of CPU, three a login) competed with the login itself for the CPU
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
start_time() { set -- $1; started=${20}; }   # of /proc/PID/stat after its ") "
caller_start=
read -r stat < "/proc/$caller/stat" && start_time "${stat##*) }" && caller_start=$started

queued() {
    # The agent is the process DIR/agent names, if it still runs (a pid alone may be reused).
    read -r apid astart < "$queue/agent" || return 1
    read -r astat < "/proc/$apid/stat" || return 1
    start_time "${astat##*) }"
    [ -n "$astart" ] && [ "$started" = "$astart" ] || return 1
    read -r boot < /proc/sys/kernel/random/boot_id || return 1
    # The name orders the calls (uptime) and is unique ($$ is ours while we run); -C: never
    # over another file. The agent takes a file only once its last field, "end", is there.
    # (DIR is root's alone, 0700: no umask of ours to set.)
    file="$queue/$uptime.$$"
    set -C
    if ! printf 'sshtrail-pam-call 1\0caller=%s\0caller_start=%s\0uptime=%s\0boot=%s\0PAM_TYPE=%s\0PAM_USER=%s\0PAM_SERVICE=%s\0PAM_TTY=%s\0PAM_RHOST=%s\0SSH_CONNECTION=%s\0SSH_AUTH_INFO_0=%s\0end\0' \
            "$caller" "$caller_start" "$uptime" "$boot" "${PAM_TYPE-}" "${PAM_USER-}" \
            "${PAM_SERVICE-}" "${PAM_TTY-}" "${PAM_RHOST-}" "${SSH_CONNECTION-}" \
            "${SSH_AUTH_INFO_0-}" > "$file"; then
        /bin/rm -f "$file"  # a part (disk full): the hook below writes the call instead
        return 1
    fi
}

if [ "$1" = --queue ]; then
    queue=$2
    shift 2
    queued 2>/dev/null && exit 0
fi
exec /usr/bin/setsid -f /bin/sh -c 'trap "" TERM; /bin/sleep "$0"; exec /usr/bin/nice -n 10 "$@"' \
    "$DEFER" "$@" --caller "$caller" ${caller_start:+--caller-start "$caller_start"} \
    --called-at-uptime "$uptime"
