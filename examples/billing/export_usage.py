#!/usr/bin/env python3
"""Export one day's usage from Tally as CSV, one row per subscription, subject and model.

A billing job's first step: ask tallyd (``tally.v1.Usage/QueryUsage``) for the sums of one
calendar day, [00:00, 24:00) in an IANA time zone, and write them as CSV for invoicing.

    python examples/billing/export_usage.py --addr 127.0.0.1:8081 --day 2026-11-23 \\
        --time-zone Europe/Paris --out usage-2026-11-23.csv

Requirements: Python 3.11+, grpcio, grpcio-tools and protobuf (``pip install -r
examples/e2e/requirements.txt``); nothing else outside the standard library.

The gRPC stubs are not checked in: at every run they are generated from the repository's
``proto/proto/tally/v1/usage.proto`` (``--proto-dir``) with ``grpc_tools.protoc`` into a
temporary directory, imported, and the directory removed. The script therefore always speaks
exactly the API of the checkout it ships with (protoc takes well under a second).

Money is exact: Tally counts nano-dollars in integers (1 USD = 10^9 nusd). The CSV carries
both ``cost_nusd`` (the integer, for systems that want it) and ``cost_usd`` (the same amount
as a decimal string with nine decimals, never a float).

Exit codes: 0 done; 1 other failure; 2 bad arguments; 3 tallyd unreachable or not answering;
4 not authenticated or not allowed (the token needs role ``billing``); 5 the day is older than
tallyd keeps (``--usage-retention``). Expected failures print one message on stderr, no
traceback.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Sequence

# tallyd's default gRPC listen address (server/src/main.rs, --grpc-listen).
DEFAULT_ADDR = "127.0.0.1:8081"
# The proto tree of the checkout this script lives in: examples/billing/../../proto/proto.
DEFAULT_PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "proto"
USAGE_PROTO = "tally/v1/usage.proto"
# QueryUsage answers at most 100,000 rows; at ~60 bytes a row that exceeds gRPC's default
# 4 MiB receive limit, so allow more.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# The dimensions QueryUsage groups by (usage.proto, QueryUsageRequest.group_by).
PLAIN_DIMENSIONS = ("subscription", "subject", "model")
NUSD_PER_USD = 10**9
# Retries of an UNAVAILABLE answer, after 0.25, 0.5, 1 and 2 s (within --timeout).
UNAVAILABLE_RETRIES = 4

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_AUTH = 4
EXIT_OUT_OF_RANGE = 5


class Failure(Exception):
    """An expected failure: its message goes to stderr and the script exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# --- arguments -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Export one day's Tally usage (per subscription, subject and model) as CSV.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad arguments, 3 tallyd unreachable, "
        "4 not authenticated / not allowed, 5 day past tallyd's retention.",
    )
    p.add_argument(
        "--addr",
        default=os.environ.get("TALLY_ADDR", DEFAULT_ADDR),
        help="tallyd's gRPC listener, host:port (an https:// prefix means TLS) "
        f"(env TALLY_ADDR; default {DEFAULT_ADDR})",
    )
    p.add_argument(
        "--token",
        help="bearer token with role billing (default: env TALLY_TOKEN; prefer the env or "
        "--token-file, since other users can see arguments in the process list). Optional: "
        "a tallyd without tokens serves billing calls to loopback peers",
    )
    p.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    p.add_argument(
        "--day",
        help="the day to export, YYYY-MM-DD (default: yesterday in --time-zone)",
    )
    p.add_argument(
        "--time-zone",
        default="UTC",
        help="IANA time zone the day is taken in, e.g. Europe/Paris (default UTC)",
    )
    p.add_argument(
        "--group-by",
        default=",".join(PLAIN_DIMENSIONS),
        help="comma-separated dimensions, in column order: subscription, subject, model, "
        "tag:KEY (default subscription,subject,model; 'subscription' alone gives one row "
        "per subscription)",
    )
    p.add_argument("--out", type=Path, help="CSV file to write (default: stdout)")
    p.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("TALLY_CA") or None,
        help="PEM CA file: connect over TLS, verifying tallyd's certificate with it (env TALLY_CA)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS verified by gRPC's default roots (implied by --ca or https://)",
    )
    p.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--client-key", type=Path, help="PEM client key (mutual TLS)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds the whole query may take, retries included (default 30)",
    )
    p.add_argument(
        "--proto-dir",
        type=Path,
        default=DEFAULT_PROTO_DIR,
        help=f"directory holding {USAGE_PROTO} (default: this checkout's proto/proto)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    args = p.parse_args(argv)

    # Checks argparse cannot do; each names its flag, and exits 2 like argparse's own.
    if not args.timeout > 0:
        p.error(f"--timeout: {args.timeout} is not a positive number of seconds")
    if (args.client_cert is None) != (args.client_key is None):
        p.error("--client-cert and --client-key go together")
    try:
        args.zone = load_zone(args.time_zone)
    except Failure as e:
        p.error(str(e))
    try:
        args.day = parse_day(args.day) if args.day else yesterday(args.zone)
    except Failure as e:
        p.error(str(e))
    try:
        args.dimensions = parse_group_by(args.group_by)
    except Failure as e:
        p.error(str(e))
    try:
        args.token = read_token(args)
    except Failure as e:
        p.error(str(e))
    return args


def parse_day(text: str) -> dt.date:
    # Strictly YYYY-MM-DD: date.fromisoformat also takes 20261123 and 2026-W48-1.
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise Failure(f"--day: {text!r} is not a date in the form YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as e:
        raise Failure(f"--day: {text!r} is not a valid date ({e})") from None


def load_zone(name: str) -> dt.tzinfo:
    if name == "UTC":
        return dt.timezone.utc  # needs no tz database
    try:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    except ImportError:  # pragma: no cover - Python 3.9+ has it
        raise Failure("--time-zone: this Python has no zoneinfo module") from None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Failure(
            f"--time-zone: {name!r} is not a known IANA time zone (e.g. Europe/Paris; "
            "if it is one, this machine lacks the tz database: install tzdata)"
        ) from None


def yesterday(zone: dt.tzinfo) -> dt.date:
    return dt.datetime.now(zone).date() - dt.timedelta(days=1)


def parse_group_by(text: str) -> list[str]:
    dims = [d.strip() for d in text.split(",") if d.strip()]
    if not dims:
        raise Failure("--group-by: give at least one of subscription, subject, model, tag:KEY")
    for d in dims:
        if d not in PLAIN_DIMENSIONS and not (d.startswith("tag:") and len(d) > 4):
            raise Failure(f"--group-by: {d!r} is not subscription, subject, model or tag:KEY")
    if len(set(dims)) != len(dims):
        raise Failure(f"--group-by: {text!r} names a dimension twice")
    return dims


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else --token-file, else env TALLY_TOKEN; None if none."""
    if args.token is not None:
        token, source = args.token, "--token"
    elif args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8")
        except OSError as e:
            raise Failure(f"--token-file: {e.strerror}: {args.token_file}") from None
        source = "--token-file"
    elif os.environ.get("TALLY_TOKEN"):
        token, source = os.environ["TALLY_TOKEN"], "TALLY_TOKEN"
    else:
        return None
    token = token.strip()
    # tallyd accepts printable ASCII without spaces; anything else could never match, and
    # gRPC metadata would refuse it with a far less clear error.
    if not token or not all("!" <= c <= "~" for c in token):
        raise Failure(f"{source}: not a bearer token (printable ASCII, no spaces)")
    return token


# --- time ------------------------------------------------------------------------------------

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def day_range_ms(day: dt.date, zone: dt.tzinfo) -> tuple[int, int]:
    """[start, end) of `day` in `zone`, Unix ms: local midnight to the next local midnight.

    A DST day is 23 or 25 hours long; a midnight that does not exist (a zone that springs
    forward at 00:00) resolves, as PEP 495's fold=0 does, to the first instant of the day.
    Integer arithmetic throughout: no float timestamps.
    """
    start = dt.datetime.combine(day, dt.time(0), tzinfo=zone)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=zone)
    one_ms = dt.timedelta(milliseconds=1)
    return (start - EPOCH) // one_ms, (end - EPOCH) // one_ms


def iso_utc(ms: int) -> str:
    return (EPOCH + dt.timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- stubs -----------------------------------------------------------------------------------


def load_stubs(proto_dir: Path):
    """Generates the tally.v1.Usage stubs from `proto_dir` and imports them.

    `grpc_tools.protoc` (from grpcio-tools) writes `tally/v1/usage_pb2.py` and
    `usage_pb2_grpc.py` into a temporary directory, which is put first on sys.path while the
    modules are imported (the gRPC module imports `tally.v1.usage_pb2` by that name) and
    then removed: imported modules live in memory.
    """
    try:
        from grpc_tools import protoc
    except ImportError:
        raise Failure(
            "grpcio-tools is not installed (it generates the gRPC stubs): "
            "pip install -r examples/e2e/requirements.txt"
        ) from None
    source = proto_dir / USAGE_PROTO
    if not source.is_file():
        raise Failure(f"--proto-dir: {source} does not exist (give the repository's proto/proto)")
    # The well-known types (google/protobuf/*.proto) that grpcio-tools ships.
    from importlib import resources

    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="tally-billing-stubs-") as out:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={proto_dir}",
                f"--proto_path={well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                USAGE_PROTO,
            ]
        )
        if status != 0:  # protoc has printed why on stderr
            raise Failure(f"generating the gRPC stubs from {source} failed (protoc exit {status})")
        sys.path.insert(0, out)
        try:
            pb2 = importlib.import_module("tally.v1.usage_pb2")
            pb2_grpc = importlib.import_module("tally.v1.usage_pb2_grpc")
        except Exception as e:  # e.g. the generated code needs a newer grpcio or protobuf
            raise Failure(
                f"importing the generated stubs failed: {e} "
                "(pip install -r examples/e2e/requirements.txt)"
            ) from None
        finally:
            sys.path.remove(out)
    return pb2, pb2_grpc


# --- the call --------------------------------------------------------------------------------


def target_and_tls(args: argparse.Namespace) -> tuple[str, bool]:
    addr = args.addr
    tls = args.tls or args.ca is not None or args.client_cert is not None
    if addr.startswith("https://"):
        addr, tls = addr[len("https://") :], True
    elif addr.startswith("http://"):
        if tls:
            raise Failure(f"--addr {args.addr}: an http:// address with TLS asked for", EXIT_USAGE)
        addr = addr[len("http://") :]
    addr = addr.rstrip("/")
    if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:/\s]+):\d{1,5}", addr):
        raise Failure(f"--addr: {args.addr!r} is not host:port", EXIT_USAGE)
    return addr, tls


def read_pem(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise Failure(f"{flag}: {e.strerror}: {path}", EXIT_USAGE) from None


def open_channel(args: argparse.Namespace, grpc):
    target, tls = target_and_tls(args)
    options = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        # No transparent proxy for a billing read: talk to the node named.
        ("grpc.enable_http_proxy", 0),
    ]
    if not tls:
        return target, tls, grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(args.ca, "--ca") if args.ca else None,
        private_key=read_pem(args.client_key, "--client-key") if args.client_key else None,
        certificate_chain=read_pem(args.client_cert, "--client-cert") if args.client_cert else None,
    )
    return target, tls, grpc.secure_channel(target, credentials, options=options)


def query_usage(args: argparse.Namespace, pb2, pb2_grpc, start_ms: int, end_ms: int):
    """Calls QueryUsage, retrying UNAVAILABLE (no leader yet, a node restarting, connection
    refused) a few times with backoff, within --timeout in all. A read is safe to retry."""
    import grpc

    target, tls, channel = open_channel(args, grpc)
    request = pb2.QueryUsageRequest(
        start_ms=start_ms,
        end_ms=end_ms,
        group_by=args.dimensions,
        # One row per group and day; each row's period start is checked below against the
        # day computed here, so the server and this machine must agree on the zone's rules.
        granularity=pb2.GRANULARITY_DAY,
        time_zone=args.time_zone,
    )
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    deadline = time.monotonic() + args.timeout
    backoff = 0.25
    attempts = 0
    with channel:
        stub = pb2_grpc.UsageStub(channel)
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            try:
                return stub.QueryUsage(request, metadata=metadata, timeout=max(remaining, 0.001))
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                retry = attempts <= UNAVAILABLE_RETRIES and remaining > backoff
                if code == grpc.StatusCode.UNAVAILABLE and retry:
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 4.0)
                    continue
                raise explain(code, details, target, tls, args, attempts) from None


def explain(code, details: str, target: str, tls: bool, args, attempts: int) -> Failure:
    """The failure to report for a gRPC error: what went wrong and what to do."""
    import grpc

    day = args.day.isoformat()
    c = grpc.StatusCode
    if code == c.UNAVAILABLE:
        hint = ""
        if "handshake" in details.lower():
            hint = " (TLS: does --ca hold the CA that signed tallyd's certificate?)"
        elif "Socket closed" in details and not tls:
            hint = " (is the listener TLS? then give --ca FILE or an https:// address)"
        return Failure(
            f"tallyd at {target} is unavailable ({attempts} attempts in {args.timeout:g} s): "
            f"{details}{hint}",
            EXIT_UNAVAILABLE,
        )
    if code == c.DEADLINE_EXCEEDED:
        return Failure(
            f"tallyd at {target} did not answer within {args.timeout:g} s (--timeout)",
            EXIT_UNAVAILABLE,
        )
    if code == c.UNAUTHENTICATED:
        hint = (
            "the token was refused: check it (--token, --token-file or TALLY_TOKEN)"
            if args.token
            else "send a token with role billing (--token, --token-file or TALLY_TOKEN)"
        )
        return Failure(
            f"not authenticated by tallyd (UNAUTHENTICATED): {details}; {hint}", EXIT_AUTH
        )
    if code == c.PERMISSION_DENIED:
        return Failure(
            f"permission denied by tallyd (PERMISSION_DENIED): {details}; "
            "the billing export needs a token with role billing or admin",
            EXIT_AUTH,
        )
    if code == c.OUT_OF_RANGE:
        # The message names the first time still held, as Unix ms: say it as a date too.
        m = re.search(r"before (\d{10,})", details)
        held = f" (usage is held from {iso_utc(int(m.group(1)))} on)" if m else ""
        return Failure(
            f"usage of {day} ({args.time_zone}) is older than tallyd keeps{held}: {details}",
            EXIT_OUT_OF_RANGE,
        )
    if code == c.RESOURCE_EXHAUSTED:
        return Failure(
            f"the answer is too large: {details}; group by fewer dimensions (--group-by)",
            EXIT_FAILURE,
        )
    if code == c.UNIMPLEMENTED:
        return Failure(
            f"{target} does not serve tally.v1.Usage/QueryUsage: is it tallyd's gRPC listener "
            f"(not its Raft or HTTP one)?" + (f" {details}" if details else ""),
            EXIT_FAILURE,
        )
    if code == c.INVALID_ARGUMENT:
        return Failure(f"tallyd refused the query (INVALID_ARGUMENT): {details}", EXIT_FAILURE)
    return Failure(f"QueryUsage failed: {code.name}: {details}", EXIT_FAILURE)


# --- CSV -------------------------------------------------------------------------------------

COUNT_COLUMNS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_nusd",
    "cost_usd",
)


def usd(nusd: int) -> str:
    """Nano-dollars as an exact dollar string with nine decimals: 12500000 -> 0.012500000."""
    whole, frac = divmod(nusd, NUSD_PER_USD)
    return f"{whole}.{frac:09d}"


def to_rows(args: argparse.Namespace, response, start_ms: int) -> list[list[str]]:
    day = args.day.isoformat()
    rows = []
    for r in response.rows:
        if r.period_start_ms != start_ms:
            # GRANULARITY_DAY rows start at the server's midnight of --time-zone.
            raise Failure(
                f"tallyd's day in {args.time_zone} starts at {iso_utc(r.period_start_ms)}, this "
                f"machine's at {iso_utc(start_ms)}: their time zone databases disagree "
                "(update tzdata here, or tallyd)"
            )
        if len(r.group) != len(args.dimensions):
            raise Failure(f"tallyd answered {len(r.group)} group values for {args.dimensions}")
        # Units (usage.proto): input_tokens counts every prompt token, cached ones included;
        # output_tokens every completion token, reasoning ones included; total = input + output,
        # Tally's METRIC_TOTAL_TOKENS. cost_nusd is what the records were charged, at the price
        # version in force when each was recorded.
        counts = (
            r.requests,
            r.input_tokens,
            r.cached_input_tokens,
            r.output_tokens,
            r.reasoning_tokens,
            r.input_tokens + r.output_tokens,
            r.cost_nusd,
        )
        rows.append([day, args.time_zone, *r.group, *map(str, counts), usd(r.cost_nusd)])
    # Deterministic order whatever the server's: by the group values, in --group-by order
    # (code-point order, which for UTF-8 is also byte order).
    rows.sort(key=lambda row: row[2 : 2 + len(args.dimensions)])
    return rows


def write_csv(args: argparse.Namespace, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    w = csv.writer(buffer, lineterminator="\n")
    w.writerow(["day", "time_zone", *args.dimensions, *COUNT_COLUMNS])
    w.writerows(rows)
    text = buffer.getvalue()
    if args.out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    # Written beside the target and renamed over it: a failed run never leaves half a file
    # for the next step of the billing pipeline to pick up.
    out = args.out
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as e:
        raise Failure(f"--out: cannot write {out}: {e.strerror}") from None


# --- main ------------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # gRPC core logs every failed TLS handshake on stderr; the error below says it once.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    start_ms, end_ms = day_range_ms(args.day, args.zone)
    if end_ms > time.time() * 1000:
        # Usage is stamped when tallyd records it: a day not yet over is still growing.
        print(
            f"warning: {args.day} in {args.time_zone} has not ended yet: the export is partial",
            file=sys.stderr,
        )
    pb2, pb2_grpc = load_stubs(args.proto_dir)
    response = query_usage(args, pb2, pb2_grpc, start_ms, end_ms)
    rows = to_rows(args, response, start_ms)
    write_csv(args, rows)
    if not args.quiet:
        requests = sum(r.requests for r in response.rows)
        cost = sum(r.cost_nusd for r in response.rows)
        print(
            f"{args.day} ({args.time_zone}, {iso_utc(start_ms)} to {iso_utc(end_ms)}): "
            f"{len(rows)} rows, {requests} requests, {usd(cost)} USD"
            + (f" -> {args.out}" if args.out else ""),
            file=sys.stderr,
        )
    return 0


def main() -> NoReturn:
    try:
        code = run()
    except Failure as e:
        print(f"export_usage: error: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
