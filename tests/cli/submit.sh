#!/bin/sh
# Acceptance test of `dcu submit`, run as a pipeline runs it: exit codes, the plain
# lines on stderr, the --json document, and the archive behind its download_url.
#
# Environment:
#   DCU            path to the dcu executable
#   DCU_SERVER     the gateway (http://host:port)
#   DCU_TOKEN      a bearer token the gateway accepts
#   GOOD_IMAGE     an image the service can package
#   MISSING_IMAGE  a well-formed reference to an image its registry does not have
#   SLOW_IMAGE     optional: an image whose task takes well over a second (the
#                  --timeout check runs only when it is given)
#   PYTHON         optional: a python3 to read JSON and hash files (default python3)
#
# Prints one line per check; on the first failure prints what failed, the command's
# stdout and stderr, and exits 1.
set -eu

: "${DCU:?set DCU to the dcu executable}"
: "${DCU_SERVER:?set DCU_SERVER to the gateway URL}"
: "${DCU_TOKEN:?set DCU_TOKEN to a token the gateway accepts}"
: "${GOOD_IMAGE:?set GOOD_IMAGE}"
: "${MISSING_IMAGE:?set MISSING_IMAGE}"
PYTHON=${PYTHON:-python3}
export DCU_SERVER DCU_TOKEN

work=$(mktemp -d "${TMPDIR:-/tmp}/dcu-submit-test.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
out="$work/stdout"
err="$work/stderr"
what=""

fail() {
    echo "submit.sh: FAIL: $what: $*" >&2
    echo "--- stdout" >&2
    cat "$out" >&2 || true
    echo "--- stderr" >&2
    cat "$err" >&2 || true
    exit 1
}

ok() {
    echo "submit.sh: ok: $what"
}

# run CMD...: CMD's stdout and stderr into $out and $err, its exit code into $rc
run() {
    rc=0
    "$@" >"$out" 2>"$err" || rc=$?
}

expect_rc() {
    [ "$rc" -eq "$1" ] || fail "exit code $rc, expected $1"
}

stderr_has() {
    grep -F -q -- "$1" "$err" || fail "stderr lacks: $1"
}

# json EXPR: EXPR (python, over the --json document `d` on stdout) printed; fails when
# stdout is not exactly one JSON document
json() {
    "$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' \
        "$out" "$1" || fail "stdout is not one JSON document (or lacks $1)"
}

is_uuid() {
    printf '%s\n' "$1" | grep -E -q '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
}

what="--wait on a good image exits 0, the task id alone on stdout, plain lines on stderr"
run "$DCU" submit --wait "$GOOD_IMAGE"
expect_rc 0
task_id=$(cat "$out")
is_uuid "$task_id" || fail "stdout is not a task id: $task_id"
stderr_has "dcu: task $task_id accepted: $GOOD_IMAGE"
stderr_has "downloading $GOOD_IMAGE"
stderr_has "completed in "
ok

what="--wait on a missing image exits 1 with the task's error on stderr"
run "$DCU" submit --wait --json "$MISSING_IMAGE"
expect_rc 1
[ "$(json 'd["state"]')" = failed ] || fail "the JSON state is not failed"
task_id=$(json 'd["task_id"]')
message=$(json 'd["error_message"]')
[ -n "$message" ] || fail "the task recorded no error message"
stderr_has "dcu submit: task $task_id failed: $message"
ok

what="--wait --json prints the completed status with its download_url, nothing else"
run "$DCU" submit --wait --json "$GOOD_IMAGE"
expect_rc 0
[ "$(json 'd["state"]')" = completed ] || fail "the JSON state is not completed"
task_id=$(json 'd["task_id"]')
object=$(json 'd["minio_object_name"] or ""')
[ -n "$object" ] || fail "no minio_object_name"
sha256=$(json 'd["archive_sha256"] or ""')
printf '%s\n' "$sha256" | grep -E -q '^[0-9a-f]{64}$' || fail "no archive_sha256: $sha256"
[ "$(json 'd["download_url"]')" = "$DCU_SERVER/api/dcu/download/$task_id" ] ||
    fail "download_url is not $DCU_SERVER/api/dcu/download/$task_id"
ok

what="the archive behind the download_url has the recorded sha256"
run "$DCU" fetch "$task_id" -o "$work/archive"
expect_rc 0
got=$("$PYTHON" -c 'import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], "rb"), "sha256").hexdigest())' "$work/archive")
[ "$got" = "$sha256" ] || fail "the archive's sha256 is $got, the task recorded $sha256"
ok

what="without --wait the task id comes back at once"
run "$DCU" submit "$GOOD_IMAGE"
expect_rc 0
is_uuid "$(cat "$out")" || fail "stdout is not a task id"
[ ! -s "$err" ] || fail "stderr is not empty"
ok

what="an invalid image reference is refused by the gateway: exit 2 with its message"
run "$DCU" submit --wait "not a valid//reference::"
expect_rc 2
stderr_has "dcu submit: the gateway refused the request: "
ok

what="a missing argument is bad usage: exit 2"
run "$DCU" submit --wait
expect_rc 2
stderr_has "the following arguments are required: IMAGE"
ok

what="a token the gateway does not know: exit 1 naming the 401"
run env DCU_TOKEN=not-a-token-of-this-gateway "$DCU" submit --wait "$GOOD_IMAGE"
expect_rc 1
stderr_has "dcu submit: the gateway answered 401: "
ok

if [ -n "${SLOW_IMAGE:-}" ]; then
    what="--timeout passes before the task ends: exit 3, the task keeps running"
    run "$DCU" submit --wait --timeout 0.2 "$SLOW_IMAGE"
    expect_rc 3
    task_id=$(cat "$out")
    stderr_has "dcu submit: task $task_id not finished after 0.2 s (--timeout); it keeps running on the server"
    ok
else
    echo "submit.sh: skipped: the --timeout check (no SLOW_IMAGE)"
fi

echo "submit.sh: all checks passed"
