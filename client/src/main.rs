//! `tally`: command-line client for a Tally node.
//!
//! Exit codes: 0 when the answer is OK (or the command succeeded), 1 when a rate-limit answer
//! is OVER_LIMIT, 2 on any error (bad arguments, connection, gRPC error, timeout, or an
//! answer whose overall code is neither OK nor OVER_LIMIT).
//!
//! Money is shown to people as US dollars with 9 decimals (computed in integers); JSON output
//! keeps integer nano-dollars (`cost_nusd`) beside the dollar string (`cost_usd`).

// clap help text in doc comments uses brackets that are not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod keys_cmd;
use tally_client::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_client::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use tally_client::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tally_client::proto::tally::v1::{
    Granularity, ListAuditRequest, QueryUsageRequest, ReportUsageRequest, Tag, UsageFilter,
};
use tally_client::{
    ClientError, TallyClient, parse_descriptor, parse_granularity, parse_price_catalog, parse_tag,
    parse_time_ms, price_json, receipt_json, render_limits, render_overview, render_prices,
    render_receipt, render_response, render_status, render_usage_rows, response_json,
    standing_json, status_fields, usage_record_json, usage_row_json,
};

const EXIT_OK: u8 = 0;
const EXIT_OVER_LIMIT: u8 = 1;
const EXIT_ERROR: u8 = 2;

const EXIT_HELP: &str =
    "Exit status: 0 when allowed (OK) or done, 1 when OVER_LIMIT, 2 on any error.";

const DESCRIPTOR_HELP: &str = "\
Descriptor syntax: key=value[,key=value...][;hits=N][;limit=N/UNIT]
  Entries keep their order; the first '=' splits key from value, so values may contain '='.
  Nothing is trimmed. Write \\, \\; \\= \\\\ for a literal comma, semicolon, '=' or backslash.
  ;hits=N        this descriptor's hits_addend, overriding --hits (;hits=0 = check only)
  ;limit=N/UNIT  limit override; UNIT is second, minute, hour, day, month or year

Examples:
  tally check --domain ai --descriptor api_key=k1,model=gpt-4o
  tally check --domain ai --descriptor 'api_key=k1;hits=0' --json
  tally kuadrant report --domain ai --descriptor api_key=k1 --hits 1200

Exit status: 0 when OK, 1 when OVER_LIMIT, 2 on any error.";

/// Command-line client for Tally, the rate-limit service for AI gateways
#[derive(Debug, Parser)]
#[command(name = "tally", version, after_help = EXIT_HELP)]
struct Cli {
    /// gRPC address of a Tally node, as host:port or http://host:port
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_ADDR",
        default_value = "http://127.0.0.1:8081",
        value_name = "ADDR"
    )]
    addr: String,

    /// Per-call timeout: 500ms, 2s, 1m (a bare number means seconds)
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_TIMEOUT",
        default_value = "2s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    timeout: Duration,

    /// Admin API token, sent as `authorization: Bearer TOKEN` with every call (needed when
    /// tallyd has --auth-tokens or TALLY_ADMIN_TOKEN). Prefer the environment variable: a
    /// flag is visible to other users in the process list.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,

    /// TLS: the CA certificate (PEM) the server's certificate is signed by (tallyd
    /// --tls-cert; for `tally cluster` against a Raft listener, --raft-tls-ca); connects
    /// over https
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_CA",
        value_name = "FILE"
    )]
    ca: Option<PathBuf>,

    /// Mutual TLS: this client's certificate (PEM), for a server with --tls-client-ca (or,
    /// for `tally cluster`, one signed by the cluster's --raft-tls-ca)
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key",
        requires = "ca"
    )]
    client_cert: Option<PathBuf>,

    /// Mutual TLS: the private key (PEM) of --client-cert
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TALLY_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask ShouldRateLimit (Envoy RLS v3) whether a request may go; debits its hits if so
    #[command(after_help = DESCRIPTOR_HELP)]
    Check(RequestArgs),
    /// Limitador-compatible calls (kuadrant.service.ratelimit.v1)
    #[command(subcommand)]
    Kuadrant(KuadrantCommand),
    /// Show the answering node's status (tally.v1.Admin/GetStatus) as key: value lines
    Status {
        /// Print a JSON object instead of key: value lines
        #[arg(long)]
        json: bool,
    },
    /// Cluster membership and status (tally.v1.Cluster). Point --addr at a node's Raft
    /// address (tallyd --raft-listen); followers pass the call on to the leader.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// List the limits in force (tally.v1.Admin/ListLimits) as a table
    Limits {
        /// Only the limits of this domain
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Metering (tally.v1.Usage): report usage, query it, see quota standings, export the
    /// usage ledger
    #[command(subcommand)]
    Usage(UsageCommand),
    /// The price catalog (tally.v1.Usage/SetPrices, ListPrices)
    #[command(subcommand)]
    Prices(PricesCommand),
    /// API keys (tally.v1.Keys): create (prints the secret once), list, show, disable,
    /// enable, delete, rotate, ephemeral
    #[command(subcommand)]
    Keys(keys_cmd::KeysCommand),
    /// Subscriptions (tiers) keys are bound to: list, show
    #[command(subcommand)]
    Subscriptions(keys_cmd::SubscriptionsCommand),
    /// The audit log of admin changes (tally.v1.Audit): who changed what, when, before and
    /// after. A table by default; --json prints one object per line with before/after
    Audit(AuditArgs),
    /// Admin API tokens for `tallyd --auth-tokens` (local: nothing is sent to a server)
    #[command(subcommand, after_help = AUTH_HELP)]
    Auth(AuthCommand),
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Records after this seq (a previous page's last seq; default: from the oldest held)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after: u64,
    /// At most this many records (1..=1000)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Only records about this target (a key id, a subscription name, `limits`, `prices`...)
    #[arg(long)]
    target: Option<String>,
    /// Only records by this actor (an admin token's name)
    #[arg(long)]
    actor: Option<String>,
    /// One JSON object per line, with the objects before and after
    #[arg(long)]
    json: bool,
}

const AUTH_HELP: &str = "\
A tokens file (tallyd --auth-tokens FILE) lists each token's SHA-256, never the token:
  - { name: ops, role: admin, token_sha256: <64 hex digits> }
  - { name: billing-job, role: billing, token_sha256: <64 hex digits> }
  - { name: dashboard, role: read-only, token_sha256: <64 hex digits> }
Clients send the token itself: TALLY_TOKEN=<token> tally status (or --token).

Examples:
  tally auth new-token
  printf %s \"$TOKEN\" | tally auth hash-token";

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Read a token from standard input and print its SHA-256 (lower-case hex), the
    /// `token_sha256` of a tokens file. Surrounding whitespace is not part of the token.
    HashToken,
    /// Print a fresh random token (256 bits) and its SHA-256
    NewToken {
        /// Print {"token": ..., "token_sha256": ...} instead of two lines
        #[arg(long)]
        json: bool,
    },
}

const USAGE_QUERY_HELP: &str = "\
Times are RFC 3339 with an offset (2026-11-01T00:00:00Z, 2026-11-01T00:00:00+01:00) or Unix
milliseconds. Except at minute granularity they must fall on a quarter hour. PERIOD is shown
in UTC; --tz decides where hours, days and months begin.

Examples:
  tally usage query --from 2026-11-01T00:00:00+01:00 --to 2026-12-01T00:00:00+01:00 \\
    --group-by subject,model --granularity day --tz Europe/Berlin
  tally usage query --from 1795435200000 --to 1795438800000 --group-by tag:team --json";

const USAGE_EXPORT_HELP: &str = "\
Prints one JSON object per usage record on stdout, in seq order, each record exactly once;
then `last_seq=N records=M` on stderr (also after an error, for what was written). A billing
job stores N and resumes with --after N.";

const PRICES_SET_HELP: &str = "\
The file is JSON: a list of models, each with every field (nano-dollars per token):
  [{\"model\": \"gpt-4o\", \"input_nusd\": 2500, \"cached_input_nusd\": 1250, \"output_nusd\": 10000}]
It replaces the whole catalog: models not listed are no longer priced.";

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Record a finished request's usage (once per request id: a retry counts nothing twice)
    Report(ReportArgs),
    /// Sums of usage over a time range, grouped and bucketed, as a table
    #[command(after_help = USAGE_QUERY_HELP)]
    Query(QueryArgs),
    /// A subject's standing against every quota that applies to it, as a table
    Overview {
        /// The subject (API key id)
        #[arg(long, value_name = "SUBJECT")]
        subject: String,
        /// Its subscription, for quotas per subscription
        #[arg(long, value_name = "SUBSCRIPTION", default_value = "")]
        subscription: String,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Export usage records after a seq as JSON lines (for billing jobs)
    #[command(after_help = USAGE_EXPORT_HELP)]
    Export {
        /// Export the records after this seq (the last one a previous export printed)
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// Export at most this many records; 0 for all
        #[arg(long, value_name = "N", default_value_t = 0)]
        max: u64,
    },
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// Idempotency key of the request (a retry with the same id is not counted again)
    #[arg(long, value_name = "ID")]
    request_id: String,
    /// Who is charged: the API key id
    #[arg(long, value_name = "SUBJECT")]
    subject: String,
    /// The subject's subscription (tier)
    #[arg(long, value_name = "SUBSCRIPTION", default_value = "")]
    subscription: String,
    /// The model (priced by the catalog)
    #[arg(long, value_name = "MODEL", default_value = "")]
    model: String,
    /// Prompt tokens, cached ones included
    #[arg(long, value_name = "N", default_value_t = 0)]
    input: u64,
    /// Completion tokens, reasoning ones included
    #[arg(long, value_name = "N", default_value_t = 0)]
    output: u64,
    /// Prompt tokens served from a cache (part of --input)
    #[arg(long, value_name = "N", default_value_t = 0)]
    cached_input: u64,
    /// Completion tokens spent reasoning (part of --output)
    #[arg(long, value_name = "N", default_value_t = 0)]
    reasoning: u64,
    /// An attribution tag, key=value; repeat for several
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<Tag>,
    /// Print the receipt as a JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// Start of the range (inclusive): RFC 3339 or Unix ms
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    from: i64,
    /// End of the range (exclusive): RFC 3339 or Unix ms
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    to: i64,
    /// Dimensions to group by, comma-separated: subject, subscription, model, tag:KEY
    #[arg(long, value_name = "DIMS", value_delimiter = ',')]
    group_by: Vec<String>,
    /// Period of each row: minute, hour, day, month or total
    #[arg(long, value_name = "PERIOD", default_value = "total", value_parser = parse_granularity)]
    granularity: Granularity,
    /// IANA time zone periods are taken in (e.g. Europe/Berlin)
    #[arg(long, value_name = "ZONE", default_value = "UTC")]
    tz: String,
    /// Only this subject's usage
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<String>,
    /// Only this subscription's usage
    #[arg(long, value_name = "SUBSCRIPTION")]
    subscription: Option<String>,
    /// Only this model's usage
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Only usage with this tag, key=value
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
    tag: Option<Tag>,
    /// Print one JSON object per row (JSON lines) instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum PricesCommand {
    /// Replace the whole price catalog from a JSON file
    #[command(after_help = PRICES_SET_HELP)]
    Set {
        /// The catalog file
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
        /// Print {"version": N} instead of a sentence
        #[arg(long)]
        json: bool,
    },
    /// Show the price catalog in force
    List {
        /// Print a JSON object {"version": N, "models": [...]} instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Make an uninitialized node (started with --no-bootstrap) the first member(s)
    Init {
        /// An initial voter as ID=HOST:PORT (its Raft address); repeat for several.
        /// None: the answering node alone.
        #[arg(long = "member", value_name = "ID=ADDR", value_parser = member_arg)]
        members: Vec<(u64, String)>,
    },
    /// Leader, term, and every member's matched log index and lag
    Status,
    /// Add a node as a learner; returns once it has caught up with the log
    AddLearner {
        /// The new node's id (its --node-id)
        #[arg(long)]
        id: u64,
        /// The new node's Raft address (its --raft-advertise, or --raft-listen)
        #[arg(long = "node-addr", value_name = "HOST:PORT")]
        node_addr: String,
    },
    /// Make a learner a voter
    Promote {
        #[arg(long)]
        id: u64,
    },
    /// Remove a voter or learner from the cluster
    Remove {
        #[arg(long)]
        id: u64,
    },
}

fn member_arg(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not ID=HOST:PORT"))?;
    let id = id
        .parse()
        .map_err(|_| format!("`{id}` is not a node id (a positive integer)"))?;
    if addr.is_empty() {
        return Err("the address must not be empty".to_string());
    }
    Ok((id, addr.to_string()))
}

#[derive(Debug, Subcommand)]
enum KuadrantCommand {
    /// CheckRateLimit: decide as ShouldRateLimit would, debiting nothing
    #[command(after_help = DESCRIPTOR_HELP)]
    Check(RequestArgs),
    /// Report: debit the hits on every matched counter, unconditionally
    #[command(after_help = DESCRIPTOR_HELP)]
    Report(RequestArgs),
}

#[derive(Debug, Args)]
struct RequestArgs {
    /// Rate-limit domain of the request
    #[arg(long, value_name = "DOMAIN")]
    domain: String,

    /// A descriptor, key=value[,key=value...][;hits=N][;limit=N/UNIT] (syntax below);
    /// repeat for several
    #[arg(
        long = "descriptor",
        value_name = "DESCRIPTOR",
        required = true,
        value_parser = descriptor_arg
    )]
    descriptors: Vec<RateLimitDescriptor>,

    /// Request-level hits_addend; 0 means 1
    #[arg(long, value_name = "N", default_value_t = 0)]
    hits: u32,

    /// Print the response as a JSON object (overall_code, statuses, headers, raw_body, ...)
    #[arg(long)]
    json: bool,
}

/// clap value parser for `--descriptor`: the error is the reason alone, since clap already
/// shows the offending value.
fn descriptor_arg(s: &str) -> Result<RateLimitDescriptor, String> {
    parse_descriptor(s).map_err(|e| match e {
        ClientError::InvalidDescriptor { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// clap value parser for `--timeout`: `<number>[ms|s|m]`, a bare number meaning seconds.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1_000)
    };
    let n: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 2s or 1m"))?;
    let ms = n
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("`{s}` is too long"))?;
    if ms == 0 {
        return Err("the timeout must be more than 0".to_string());
    }
    Ok(Duration::from_millis(ms))
}

/// `tally ... | head` ends quietly, as command-line tools do. Rust ignores SIGPIPE (network
/// writes rely on that), so a closed stdout makes `println!` panic; that one panic ends the
/// process with the status a shell reports for SIGPIPE (141), without the panic message.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tally: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, ClientError> {
    if let Command::Auth(command) = cli.command {
        return run_auth(command);
    }
    let mut client = match &cli.ca {
        None => TallyClient::connect(&cli.addr).await?,
        Some(ca) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| ClientError::InvalidInput {
                    what: format!("TLS file {}", path.display()),
                    reason: e.to_string(),
                })
            };
            let identity = match (&cli.client_cert, &cli.client_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            let tls = tally_client::ClientTls {
                ca_pem: read(ca)?,
                identity,
            };
            TallyClient::connect_tls(&cli.addr, &tls).await?
        }
    }
    .with_timeout(cli.timeout);
    if let Some(token) = &cli.token {
        client = client.with_token(token)?;
    }
    match cli.command {
        Command::Check(args) => {
            let response = client
                .should_rate_limit(&args.domain, args.descriptors, args.hits)
                .await?;
            Ok(print_response(&response, args.json))
        }
        Command::Kuadrant(KuadrantCommand::Check(args)) => {
            let response = client
                .kuadrant_check(&args.domain, args.descriptors, args.hits)
                .await?;
            Ok(print_response(&response, args.json))
        }
        Command::Kuadrant(KuadrantCommand::Report(args)) => {
            let response = client
                .kuadrant_report(&args.domain, args.descriptors, args.hits)
                .await?;
            Ok(print_response(&response, args.json))
        }
        Command::Status { json } => {
            let status = client.status().await?;
            if json {
                let object: serde_json::Map<String, serde_json::Value> = status_fields(&status)
                    .into_iter()
                    .map(|(key, value)| {
                        // Every field is an integer; keep it a JSON number.
                        let value = value
                            .parse::<i128>()
                            .ok()
                            .and_then(|n| serde_json::Number::from_i128(n).map(Into::into))
                            .unwrap_or(serde_json::Value::String(value));
                        (key.to_string(), value)
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(object));
            } else {
                print!("{}", render_status(&status));
            }
            Ok(EXIT_OK)
        }
        Command::Cluster(command) => {
            let status = match command {
                ClusterCommand::Init { members } => client.cluster_init(&members).await?,
                ClusterCommand::Status => client.cluster_status().await?,
                ClusterCommand::AddLearner { id, node_addr } => {
                    client.cluster_add_learner(id, &node_addr).await?
                }
                ClusterCommand::Promote { id } => client.cluster_promote(id).await?,
                ClusterCommand::Remove { id } => client.cluster_remove(id).await?,
            };
            print!("{}", tally_client::render_cluster(&status));
            Ok(EXIT_OK)
        }
        Command::Limits { domain, json } => {
            let limits = client.list_limits(domain.as_deref()).await?;
            if json {
                let array: Vec<serde_json::Value> = limits
                    .limits
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "domain": l.domain,
                            "name": l.name,
                            "capacity": l.capacity,
                            "window": l.window,
                            "matcher": l.matcher,
                            "variables": l.variables,
                            "shadow": l.shadow,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(array));
            } else {
                print!("{}", render_limits(&limits));
            }
            Ok(EXIT_OK)
        }
        Command::Usage(command) => run_usage(&client, command).await,
        Command::Prices(command) => run_prices(&client, command).await,
        Command::Keys(command) => keys_cmd::run_keys(&client, command).await,
        Command::Subscriptions(command) => keys_cmd::run_subscriptions(&client, command).await,
        Command::Audit(args) => run_audit(&client, args).await,
        Command::Auth(_) => unreachable!("handled before connecting"),
    }
}

/// `tally audit`: one page of the audit log.
async fn run_audit(client: &TallyClient, args: AuditArgs) -> Result<u8, ClientError> {
    let page = client
        .list_audit(ListAuditRequest {
            after_seq: args.after,
            limit: args.limit,
            target: args.target.unwrap_or_default(),
            actor: args.actor.unwrap_or_default(),
        })
        .await?;
    if args.json {
        for r in &page.records {
            println!("{}", tally_client::audit_json(r));
        }
    } else {
        print!("{}", tally_client::render_audit(&page.records));
        if page.first_seq > 1 && args.after + 1 < page.first_seq {
            eprintln!(
                "(records before seq {} were dropped: the log keeps the newest 10,000)",
                page.first_seq
            );
        }
    }
    Ok(EXIT_OK)
}

/// `tally auth`: local token helpers.
fn run_auth(command: AuthCommand) -> Result<u8, ClientError> {
    match command {
        AuthCommand::HashToken => {
            let mut token = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut token).map_err(
                |e| ClientError::InvalidInput {
                    what: "standard input".to_string(),
                    reason: e.to_string(),
                },
            )?;
            let token = token.trim();
            if token.is_empty() {
                return Err(ClientError::InvalidInput {
                    what: "token".to_string(),
                    reason: "standard input holds no token".to_string(),
                });
            }
            println!("{}", tally_client::token_sha256(token));
        }
        AuthCommand::NewToken { json } => {
            let token = tally_client::new_token()?;
            let hash = tally_client::token_sha256(&token);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "token": token, "token_sha256": hash })
                );
            } else {
                println!("token: {token}");
                println!("token_sha256: {hash}");
            }
        }
    }
    Ok(EXIT_OK)
}

async fn run_usage(client: &TallyClient, command: UsageCommand) -> Result<u8, ClientError> {
    match command {
        UsageCommand::Report(args) => {
            let receipt = client
                .report_usage(ReportUsageRequest {
                    request_id: args.request_id,
                    subject: args.subject,
                    subscription: args.subscription,
                    model: args.model,
                    input_tokens: args.input,
                    output_tokens: args.output,
                    cached_input_tokens: args.cached_input,
                    reasoning_tokens: args.reasoning,
                    tags: args.tags,
                })
                .await?;
            if args.json {
                println!("{}", receipt_json(&receipt));
            } else {
                print!("{}", render_receipt(&receipt));
            }
            Ok(EXIT_OK)
        }
        UsageCommand::Query(args) => {
            let filter = UsageFilter {
                subject: args.subject,
                subscription: args.subscription,
                model: args.model,
                tag: args.tag,
            };
            let response = client
                .query_usage(QueryUsageRequest {
                    start_ms: args.from,
                    end_ms: args.to,
                    group_by: args.group_by.clone(),
                    granularity: args.granularity as i32,
                    time_zone: args.tz,
                    filter: Some(filter),
                })
                .await?;
            if args.json {
                for row in &response.rows {
                    println!("{}", usage_row_json(row, &args.group_by));
                }
            } else {
                print!("{}", render_usage_rows(&response.rows, &args.group_by));
            }
            Ok(EXIT_OK)
        }
        UsageCommand::Overview {
            subject,
            subscription,
            json,
        } => {
            let overview = client.usage_overview(&subject, &subscription).await?;
            if json {
                let array: Vec<serde_json::Value> =
                    overview.standings.iter().map(standing_json).collect();
                println!("{}", serde_json::Value::Array(array));
            } else {
                print!("{}", render_overview(&overview));
            }
            Ok(EXIT_OK)
        }
        UsageCommand::Export { after, max } => export(client, after, max).await,
    }
}

/// Streams an export to stdout as JSON lines; reports the last seq written on stderr, also
/// when the export stops on an error (so a job can resume from it).
async fn export(client: &TallyClient, after: u64, max: u64) -> Result<u8, ClientError> {
    let mut export = client.export_usage(after, max).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut last_seq, mut records) = (after, 0u64);
    let mut failure = None;
    loop {
        match export.next().await {
            Ok(Some(record)) => {
                if let Err(e) = writeln!(out, "{}", usage_record_json(&record)) {
                    failure = Some(stdout_error(e));
                    break;
                }
                last_seq = record.seq;
                records += 1;
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Err(e) = out.flush() {
        // What reached stdout is unknown: claim no seq.
        return Err(stdout_error(e));
    }
    drop(out);
    eprintln!("last_seq={last_seq} records={records}");
    match failure {
        None => Ok(EXIT_OK),
        Some(e) => Err(e),
    }
}

fn stdout_error(e: std::io::Error) -> ClientError {
    ClientError::InvalidInput {
        what: "output".to_string(),
        reason: format!("cannot write to stdout: {e}"),
    }
}

async fn run_prices(client: &TallyClient, command: PricesCommand) -> Result<u8, ClientError> {
    match command {
        PricesCommand::Set { file, json } => {
            let what = format!("price file {}", file.display());
            let invalid = |reason: String| ClientError::InvalidInput {
                what: what.clone(),
                reason,
            };
            let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            if matches!(extension, "yaml" | "yml") {
                return Err(invalid(
                    "YAML price files are not supported by this build; write the catalog as JSON"
                        .to_string(),
                ));
            }
            let text = std::fs::read_to_string(&file).map_err(|e| invalid(e.to_string()))?;
            let models = parse_price_catalog(&text).map_err(invalid)?;
            let count = models.len();
            let version = client.set_prices(models).await?;
            if json {
                println!("{}", serde_json::json!({ "version": version }));
            } else {
                println!("price catalog version {version} in force ({count} models)");
            }
            Ok(EXIT_OK)
        }
        PricesCommand::List { json } => {
            let prices = client.list_prices().await?;
            if json {
                let models: Vec<serde_json::Value> = prices.models.iter().map(price_json).collect();
                println!(
                    "{}",
                    serde_json::json!({ "version": prices.version, "models": models })
                );
            } else {
                print!("{}", render_prices(&prices));
            }
            Ok(EXIT_OK)
        }
    }
}

/// Prints a rate-limit answer and returns the exit code its overall code calls for.
fn print_response(response: &RateLimitResponse, json: bool) -> u8 {
    if json {
        println!("{}", response_json(response));
    } else {
        print!("{}", render_response(response));
    }
    match Code::try_from(response.overall_code) {
        Ok(Code::Ok) => EXIT_OK,
        Ok(Code::OverLimit) => EXIT_OVER_LIMIT,
        _ => {
            eprintln!(
                "tally: the server answered overall code {}",
                tally_client::code_name(response.overall_code)
            );
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_timeout("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_timeout("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("fast").is_err());
        assert!(parse_timeout("1.5s").is_err());
    }

    #[test]
    fn check_arguments_parse() {
        let cli = Cli::try_parse_from([
            "tally",
            "check",
            "--domain",
            "ai",
            "--descriptor",
            "api_key=k1,model=m",
            "--descriptor",
            "api_key=k1;hits=0",
            "--hits",
            "7",
            "--json",
            "--addr",
            "10.0.0.1:9000",
        ])
        .unwrap();
        assert_eq!(cli.addr, "10.0.0.1:9000");
        let Command::Check(args) = cli.command else {
            panic!("expected check");
        };
        assert_eq!(args.domain, "ai");
        assert_eq!(args.descriptors.len(), 2);
        assert_eq!(args.descriptors[1].hits_addend, Some(0));
        assert_eq!(args.hits, 7);
        assert!(args.json);
    }

    #[test]
    fn bad_descriptor_is_a_usage_error() {
        let err = Cli::try_parse_from(["tally", "check", "--domain", "d", "--descriptor", "=x"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("empty key"), "{err}");
        let err = Cli::try_parse_from(["tally", "check", "--domain", "d"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn usage_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "tally",
            "usage",
            "report",
            "--request-id",
            "r1",
            "--subject",
            "k1",
            "--model",
            "gpt-4o",
            "--input",
            "100",
            "--cached-input",
            "40",
            "--tag",
            "team=search",
            "--tag",
            "env=",
        ])
        .unwrap();
        let Command::Usage(UsageCommand::Report(args)) = cli.command else {
            panic!("expected usage report");
        };
        assert_eq!((args.input, args.cached_input, args.output), (100, 40, 0));
        assert_eq!(args.tags.len(), 2);
        assert_eq!(
            (args.tags[1].key.as_str(), args.tags[1].value.as_str()),
            ("env", "")
        );

        let cli = Cli::try_parse_from([
            "tally",
            "usage",
            "query",
            "--from",
            "2026-11-01T00:00:00+01:00",
            "--to",
            "1795435200000",
            "--group-by",
            "subject,model,tag:team",
            "--granularity",
            "HOUR",
            "--tz",
            "Europe/Berlin",
        ])
        .unwrap();
        let Command::Usage(UsageCommand::Query(args)) = cli.command else {
            panic!("expected usage query");
        };
        assert_eq!(args.from, 1_793_487_600_000);
        assert_eq!(args.to, 1_795_435_200_000);
        assert_eq!(args.group_by, ["subject", "model", "tag:team"]);
        assert_eq!(args.granularity, Granularity::Hour);
        assert_eq!(args.tag, None);

        let err = Cli::try_parse_from([
            "tally",
            "usage",
            "query",
            "--from",
            "yesterday",
            "--to",
            "0",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("RFC 3339"), "{err}");
        let err = Cli::try_parse_from([
            "tally",
            "usage",
            "report",
            "--request-id",
            "r",
            "--subject",
            "s",
            "--tag",
            "novalue",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("key=value"), "{err}");

        let cli = Cli::try_parse_from(["tally", "usage", "export", "--after", "1200"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Usage(UsageCommand::Export {
                after: 1200,
                max: 0
            })
        ));
        let cli = Cli::try_parse_from(["tally", "prices", "set", "--file", "p.json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Prices(PricesCommand::Set { .. })
        ));
    }

    #[test]
    fn token_and_auth_subcommands_parse() {
        let cli = Cli::try_parse_from(["tally", "status", "--token", "t0k3n"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("t0k3n"));
        let cli = Cli::try_parse_from(["tally", "auth", "hash-token"]).unwrap();
        assert!(matches!(cli.command, Command::Auth(AuthCommand::HashToken)));
        let cli = Cli::try_parse_from(["tally", "auth", "new-token", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Auth(AuthCommand::NewToken { json: true })
        ));
    }

    #[test]
    fn kuadrant_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "tally",
            "kuadrant",
            "report",
            "--domain",
            "d",
            "--descriptor",
            "k=v",
            "--hits",
            "120",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Kuadrant(KuadrantCommand::Report(RequestArgs { hits: 120, .. }))
        ));
    }
}
