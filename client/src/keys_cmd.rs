//! `tally keys ...` and `tally subscriptions ...`.

use clap::Subcommand;
use tally_client::proto::tally::v1::{
    CreateEphemeralKeyRequest, CreateKeyRequest, KeyWithSecret, Label, PutMode,
};
use tally_client::{
    ClientError, TallyClient, key_json, render_keys, render_subscriptions, subscription_json,
};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key bound to a subscription; prints its secret, shown this once
    Create {
        #[arg(long)]
        name: String,
        /// The subscription (tier) it is bound to, for good
        #[arg(long, required_unless_present = "legacy")]
        subscription: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// A label, `key=value` (repeatable)
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<Label>,
        /// Expiry, Unix time in ms (default: never)
        #[arg(long, value_name = "MS", default_value_t = 0)]
        expires_ms: i64,
        /// A key with no subscription and no limits
        #[arg(long, conflicts_with = "subscription")]
        legacy: bool,
        /// This key's own values for fields of its subscription: a file in the config's
        /// subscription syntax without `name` (e.g. `requests_per_minute: 100`)
        #[arg(long, value_name = "PATH", conflicts_with = "legacy")]
        overrides_file: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Replace a key's overrides of its subscription's fields (from --file, in the config's
    /// subscription syntax without `name`), or --clear them (back to the tier's values)
    Override {
        id: String,
        #[arg(long, value_name = "PATH", required_unless_present = "clear")]
        file: Option<std::path::PathBuf>,
        #[arg(long, conflicts_with = "file")]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one key
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Disable a key: refused (403) from the next request on
    Disable { id: String },
    /// Enable a disabled key
    Enable { id: String },
    /// Delete a key for good (its id is never valid again)
    Delete { id: String },
    /// New secret; the old one stays valid for --grace-ms (at most 7 days)
    Rotate {
        id: String,
        #[arg(long, value_name = "MS", default_value_t = 0)]
        grace_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// A short-lived key for the key in --api-key (or, for an admin, --subscription)
    Ephemeral {
        #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        /// Lifetime in ms (default 4 h, at most 24 h)
        #[arg(long, value_name = "MS", default_value_t = 0)]
        ttl_ms: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// List subscriptions (tiers) and their limits
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one subscription
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Create subscriptions from a file in the config's syntax (`subscriptions:` list, YAML
    /// or JSON); refused if one exists
    Create {
        #[arg(long, value_name = "PATH")]
        file: std::path::PathBuf,
    },
    /// Replace subscriptions from such a file; refused if one does not exist
    Update {
        #[arg(long, value_name = "PATH")]
        file: std::path::PathBuf,
    },
    /// Delete a subscription no key is bound to
    Delete { name: String },
}

fn label_arg(s: &str) -> Result<Label, String> {
    let (key, value) = s.split_once('=').ok_or("a label is key=value")?;
    Ok(Label {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

fn read_file(path: &std::path::Path, what: &str) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|e| ClientError::InvalidInput {
        what: format!("{what} {}", path.display()),
        reason: e.to_string(),
    })
}

fn print_secret(made: &KeyWithSecret, json: bool) {
    let key = made.key.clone().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({ "key": key_json(&key), "secret": made.secret })
        );
    } else {
        println!("key {} ({})", key.id, key.name);
        println!("secret: {}", made.secret);
        println!("(shown this once: store it now)");
    }
}

pub async fn run_keys(client: &TallyClient, command: KeysCommand) -> Result<u8, ClientError> {
    match command {
        KeysCommand::Create {
            name,
            subscription,
            description,
            labels,
            expires_ms,
            legacy,
            overrides_file,
            json,
        } => {
            let request = CreateKeyRequest {
                name,
                description,
                subscription: subscription.unwrap_or_default(),
                labels,
                expires_ms,
                legacy,
                overrides: match overrides_file {
                    Some(path) => read_file(&path, "overrides file")?,
                    None => String::new(),
                },
            };
            print_secret(&client.create_key(request).await?, json);
        }
        KeysCommand::List { json } => {
            let keys = client.list_keys().await?;
            if json {
                let all: Vec<_> = keys.iter().map(key_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                print!("{}", render_keys(&keys));
            }
        }
        KeysCommand::Show { id, json } => {
            let key = client.get_key(&id).await?;
            if json {
                println!("{}", key_json(&key));
            } else {
                print!("{}", render_keys(std::slice::from_ref(&key)));
                if !key.overrides_json.is_empty() {
                    println!("overrides: {}", key.overrides_json);
                }
            }
        }
        KeysCommand::Disable { id } => {
            client.set_key_enabled(&id, false).await?;
            println!("key {id} disabled");
        }
        KeysCommand::Enable { id } => {
            client.set_key_enabled(&id, true).await?;
            println!("key {id} enabled");
        }
        KeysCommand::Delete { id } => {
            client.delete_key(&id).await?;
            println!("key {id} deleted for good");
        }
        KeysCommand::Override {
            id,
            file,
            clear: _,
            json,
        } => {
            let document = match file {
                Some(path) => read_file(&path, "overrides file")?,
                None => String::new(),
            };
            let key = client.set_key_overrides(&id, document).await?;
            if json {
                println!("{}", key_json(&key));
            } else if key.overrides_json.is_empty() {
                println!("key {id}: no overrides (its subscription's values apply)");
            } else {
                println!("key {id} overrides: {}", key.overrides_json);
            }
        }
        KeysCommand::Rotate { id, grace_ms, json } => {
            print_secret(&client.rotate_key(&id, grace_ms).await?, json);
        }
        KeysCommand::Ephemeral {
            api_key,
            subscription,
            ttl_ms,
            json,
        } => {
            let request = CreateEphemeralKeyRequest {
                api_key: api_key.unwrap_or_default(),
                name: String::new(),
                subscription: subscription.unwrap_or_default(),
                ttl_ms,
            };
            print_secret(&client.create_ephemeral_key(request).await?, json);
        }
    }
    Ok(0)
}

pub async fn run_subscriptions(
    client: &TallyClient,
    command: SubscriptionsCommand,
) -> Result<u8, ClientError> {
    let (mode, file) = match &command {
        SubscriptionsCommand::Create { file } => (PutMode::Create, file),
        SubscriptionsCommand::Update { file } => (PutMode::Update, file),
        SubscriptionsCommand::Delete { name } => {
            client.delete_subscription(name).await?;
            println!("subscription {name} deleted");
            return Ok(0);
        }
        _ => return show_subscriptions(client, command).await,
    };
    let document = read_file(file, "subscriptions file")?;
    let put = client.put_subscriptions(document, mode).await?;
    print!("{}", render_subscriptions(&put));
    Ok(0)
}

async fn show_subscriptions(
    client: &TallyClient,
    command: SubscriptionsCommand,
) -> Result<u8, ClientError> {
    let subs = client.list_subscriptions().await?;
    let (subs, json) = match command {
        SubscriptionsCommand::List { json } => (subs, json),
        SubscriptionsCommand::Show { name, json } => {
            let one: Vec<_> = subs.into_iter().filter(|s| s.name == name).collect();
            if one.is_empty() {
                return Err(ClientError::InvalidInput {
                    what: "subscription".into(),
                    reason: format!("no subscription {name:?}"),
                });
            }
            (one, json)
        }
        _ => unreachable!("run_subscriptions handles the others"),
    };
    if json {
        let all: Vec<_> = subs.iter().map(subscription_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", render_subscriptions(&subs));
    }
    Ok(0)
}
