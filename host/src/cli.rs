//! The command line: `serve`, and `broker check`.
//!
//! Why clap: derive-based, well kept, and it writes the `--help` text.

use crate::config::Config;
use crate::runtime::engine::new_engine;
use crate::runtime::registry::inspect;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// para-host: a Para-compatible backend with WebAssembly IoT brokers.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host: the /v1 API and the broker poll loops.
    Serve {
        /// Config file (flat `para.key = value` TOML/HOCON). PARA_* env vars override it.
        #[arg(long, short, env = "PARA_CONFIG_FILE")]
        config: Option<PathBuf>,
        /// Listen address (overrides para.host.listen), e.g. 127.0.0.1:0.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Database file (overrides para.host.db).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Manage apps (the owners of things and holders of API credentials).
    App {
        /// Config file, for the database and master key locations.
        #[arg(long, short, env = "PARA_CONFIG_FILE", global = true)]
        config: Option<PathBuf>,
        /// Database file (overrides para.host.db).
        #[arg(long, global = true)]
        db: Option<PathBuf>,
        /// What to do.
        #[command(subcommand)]
        command: AppCommand,
    },
    /// Work with broker components.
    Broker {
        /// What to do with the broker.
        #[command(subcommand)]
        command: BrokerCommand,
    },
}

/// `app` subcommands.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app; prints its credentials once.
    Create {
        /// The app name; its access key is `app:<name>`.
        name: String,
    },
    /// List apps (ids and status; never secrets).
    List,
    /// Deactivate an app: its requests get 403 until it is enabled again.
    Disable {
        /// The app name or `app:<name>`.
        name: String,
    },
    /// Reactivate an app.
    Enable {
        /// The app name or `app:<name>`.
        name: String,
    },
}

/// `broker` subcommands.
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Load a component and report whether it implements the contract.
    Check {
        /// The component file (`.wasm`, built for wasm32-wasip2).
        component: PathBuf,
    },
}

fn set_active(store: &SqliteStore, name: &str, active: bool) -> anyhow::Result<()> {
    let id = crate::auth::normalize_app_id(name);
    let mut app = store
        .app_get(&id)?
        .ok_or_else(|| anyhow::anyhow!("no app {id}; `para-host app list` shows them"))?;
    app.active = active;
    store.app_put(&app)?;
    println!("{id}\t{}", if active { "active" } else { "inactive" });
    Ok(())
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen, db } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = db {
                cfg.db_path = d;
            }
            crate::serve::serve(cfg).await
        }
        Command::App {
            config,
            db,
            command,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(d) = db {
                cfg.db_path = d;
            }
            let store = SqliteStore::open(&cfg.db_path)?;
            let keys = crate::serve::app_keys(&cfg)?;
            keys.ensure_root(&store)?;
            match command {
                AppCommand::Create { name } => {
                    let creds = keys.create_app(&store, &name)?;
                    println!(
                        "{}",
                        serde_json::json!({"accessKey": creds.access_key, "secretKey": creds.secret_key})
                    );
                    eprintln!("Save the secret key now: it is not shown again.");
                }
                AppCommand::Disable { name } => set_active(&store, &name, false)?,
                AppCommand::Enable { name } => set_active(&store, &name, true)?,
                AppCommand::List => {
                    for app in store.app_list()? {
                        println!(
                            "{}\t{}",
                            app.id,
                            if app.active { "active" } else { "inactive" }
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Broker {
            command: BrokerCommand::Check { component },
        } => {
            let engine = new_engine(None)?;
            let (_, _, report) = inspect(&engine, "check", &component)?;
            println!(
                "ok: {} implements {} (contract version {})",
                component.display(),
                report.export,
                report.version
            );
            println!("imports:");
            for i in report.imports {
                println!("  {i}");
            }
            Ok(())
        }
    }
}
