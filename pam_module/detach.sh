#!/bin/sh
# What pam_exec.so runs in fail-open mode: start the hook in a session of its own and return at
# once, so a login never waits for the recording of it (pam_exec waits only for this process).
# $PPID here is the process that called PAM (sshd); the detached hook could not learn it later.
# Usage: detach.sh PYTHON ARGS...   (the hook's own command line)
# nice: the recording competes with the login it records for CPU; let the login win. (Not
# SCHED_IDLE: under sustained load it could starve past pam.timeout and lose the event.)
# The time of the PAM call is taken here, before detaching: the detached hooks of one login
# start in any order on a busy host, and an attempt stamped after the session that granted it
# would be reported as refused. /proc/uptime, by the shell's own read: no exec on the login's path.
caller=$PPID
read uptime _ < /proc/uptime
exec /usr/bin/setsid -f /usr/bin/nice -n 10 "$@" --caller "$caller" --called-at-uptime "$uptime"
