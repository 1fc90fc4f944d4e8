# The two commands (README): `make demo` and `make test`. Both install what they need and are
# safe to run again: every step checks before it changes anything.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := openssh-server openssh-client sshpass zsh tcsh git python3-venv python3-dev python3-bpfcc \
                linux-headers-amd64 asciinema sqlite3 libpam-modules passwd procps rsync util-linux \
                postgresql \
                binutils rpm lintian debootstrap systemd
KREL := $(shell uname -r)

.PHONY: demo test setup system venv bench clean deb rpm

demo: setup
	$(PY) tests/demo.py

test: setup
	$(PY) -m pytest -q tests

# auditd is for bench/ebpf's reference column only, so it is not among APT_PACKAGES (make test).
bench: setup
	@dpkg-query -W -f='$${Status}\n' auditd 2>/dev/null | grep -q '^install ok installed' || { \
	  echo "installing: auditd"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq auditd >/dev/null; \
	}
	$(PY) bench/login
	$(PY) bench/pty
	$(PY) bench/ebpf
	$(PY) bench/collector
	$(PY) bench/replay

setup: system venv

# Debian packages; apt-get update only when something is missing. policy-rc.d (where present)
# keeps the host's own sshd from being started by the openssh-server install.
system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# BCC compiles against kernel headers; none match this kernel, Debian's amd64 headers serve.
	@hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
	common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1); \
	mkdir -p /lib/modules/$(KREL); \
	[ -e /lib/modules/$(KREL)/build ] || ln -s $$hdr /lib/modules/$(KREL)/build; \
	[ -e /lib/modules/$(KREL)/source ] || ln -s $$common /lib/modules/$(KREL)/source
	@mkdir -p /run/sshd

# The virtualenv is made from Debian's python3 with system site packages: that is where BCC's
# Python bindings (python3-bpfcc) live.
venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Packages (packaging/build.py; packaging/README.md says what goes where). Rebuilt only when a
# file they are made of changed; the tests call these targets too.
VERSION := $(shell sed -n 's/^version *= *//p' setup.cfg)
PKG_SOURCES := setup.cfg README.md $(shell find sshtrail pam_module session_wrapper ebpf collector \
                 packaging -type f -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null)
DEBS := dist/sshtrail_$(VERSION)-1_all.deb dist/sshtrail-collector_$(VERSION)-1_amd64.deb
RPMS := dist/sshtrail-$(VERSION)-1.x86_64.rpm dist/sshtrail-collector-$(VERSION)-1.x86_64.rpm

deb: setup
	@$(MAKE) --no-print-directory $(DEBS)

rpm: setup
	@$(MAKE) --no-print-directory $(RPMS)

$(DEBS) &: $(PKG_SOURCES)
	$(PY) packaging/build.py deb

$(RPMS) &: $(PKG_SOURCES)
	$(PY) packaging/build.py rpm

clean:
	rm -rf $(VENV) *.egg-info build dist
