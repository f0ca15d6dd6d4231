//! `tally`: command-line client for a Tally node.
//!
//! Exit codes: 0 when the answer is OK (or the command succeeded), 1 when a rate-limit answer
//! is OVER_LIMIT, 2 on any error (bad arguments, connection, gRPC error, timeout, or an
//! answer whose overall code is neither OK nor OVER_LIMIT).

// clap help text in doc comments uses brackets that are not links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tally_client::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tally_client::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use tally_client::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tally_client::{
    ClientError, TallyClient, parse_descriptor, render_limits, render_response, render_status,
    response_json, status_fields,
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
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
    let client = TallyClient::connect(&cli.addr)
        .await?
        .with_timeout(cli.timeout);
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
