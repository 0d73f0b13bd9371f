#!/bin/sh
# FaceSym container entrypoint: runs `facesym "$@"` (default CMD: serve).
#
# PGPASSWORD_FILE (a mounted secret holding the PostgreSQL password) becomes a libpq password file at
# $PGPASSFILE (default /tmp/facesym.pgpass, mode 0600): libpq ignores a password file that group or
# others may read, and a mounted secret often is; this way the password is never in the environment
# nor in FACESYM_DATABASE_URL (postgresql://facesym@postgres:5432/facesym carries no password).
set -eu

if [ -n "${PGPASSWORD_FILE:-}" ]; then
    if [ ! -r "$PGPASSWORD_FILE" ]; then
        echo "facesym-entrypoint: PGPASSWORD_FILE $PGPASSWORD_FILE is not readable" >&2
        exit 78  # EX_CONFIG
    fi
    PGPASSFILE="${PGPASSFILE:-/tmp/facesym.pgpass}"
    umask 077
    # .pgpass line hostname:port:database:username:password; ':' and '\' in the password are escaped.
    # (Command substitution drops the secret file's trailing newline.)
    password=$(cat "$PGPASSWORD_FILE")
    printf '*:*:*:*:%s\n' "$(printf '%s' "$password" | sed 's/[\\:]/\\&/g')" > "$PGPASSFILE.tmp"
    mv -f "$PGPASSFILE.tmp" "$PGPASSFILE"
    unset password PGPASSWORD_FILE
    export PGPASSFILE
fi

exec facesym "$@"
