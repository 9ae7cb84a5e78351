//! `azure-iot-hub-emulator`: `serve` runs the emulated hub; `device` plays a device.
//!
//! Exists as the entry point other test code spawns; the command-line shapes here are a
//! contract (see `tests/emulator/README.md` and `--help`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use azure_iot_hub_emulator::device_sim::{self, Action};
use azure_iot_hub_emulator::server::{Emulator, ServeOptions};
use clap::{Parser, Subcommand};

/// A strict local Azure IoT Hub emulator and device simulator.
#[derive(Debug, Parser)]
#[command(name = "azure-iot-hub-emulator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub; prints one JSON line on stdout when ready.
    Serve {
        /// Address to listen on (plain HTTP only on loopback).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Hub hostname for SAS `sr` and `HostName=` (default: the bound host:port).
        #[arg(long)]
        hostname: Option<String>,
        /// Base64 key of the iothubowner policy (default: 32 random bytes).
        #[arg(long)]
        owner_key: Option<String>,
        /// Base64 key of the service policy (default: 32 random bytes).
        #[arg(long)]
        service_key: Option<String>,
        /// Serve HTTPS with the generated CA (always written as ca.pem into --cert-dir; the
        /// AMQP endpoint always uses it).
        #[arg(long)]
        tls: bool,
        /// Where to write ca.pem (default: a new temporary directory).
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// Log every request to stderr.
        #[arg(long)]
        verbose: bool,
        /// Event Hub-compatible name (default: the hub name, i.e. the hostname up to the
        /// first '.' or ':').
        #[arg(long)]
        eventhub_name: Option<String>,
    },
    /// Act as a device, authenticated by its connection string.
    Device {
        /// `HostName=..;DeviceId=..;SharedAccessKey=..`
        #[arg(long)]
        connection_string: String,
        /// Scheme and address to use instead of `https://{HostName}`.
        #[arg(long)]
        endpoint: Option<String>,
        /// PEM file of the CA to trust for https.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[command(subcommand)]
        action: DeviceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Merge-patch the device's reported properties with a JSON object.
    Report {
        /// The JSON object.
        json: String,
    },
    /// Send one telemetry message (device-to-cloud).
    Send {
        /// The message body (JSON).
        json: String,
        /// Application property `name=value` (repeatable), sent as `iothub-app-name`.
        #[arg(long = "property")]
        properties: Vec<String>,
    },
}

async fn serve(opts: ServeOptions) -> Result<()> {
    let emulator = Emulator::bind(opts).await?;
    let line = serde_json::to_string(&emulator.ready)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    eprintln!(
        "azure-iot-hub-emulator: serving {} as hub '{}'",
        emulator.ready.endpoint, emulator.ready.hostname
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    emulator.run(shutdown).await;
    eprintln!("azure-iot-hub-emulator: stopped");
    Ok(())
}

async fn device(
    connection_string: String,
    endpoint: Option<String>,
    ca_file: Option<PathBuf>,
    cmd: DeviceCommand,
) -> Result<bool> {
    let cs = device_sim::parse_connection_string(&connection_string)?;
    let action = match cmd {
        DeviceCommand::Report { json } => Action::Report(
            serde_json::from_str(&json).context("the reported properties are not valid JSON")?,
        ),
        DeviceCommand::Send { json, properties } => {
            serde_json::from_str::<serde_json::Value>(&json)
                .context("the message body is not valid JSON")?;
            let properties = properties
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--property '{p}' must be name=value"))
                })
                .collect::<Result<Vec<_>>>()?;
            Action::Send {
                body: json.into_bytes(),
                properties,
            }
        }
    };
    let resp = device_sim::run(&cs, endpoint.as_deref(), ca_file.as_deref(), action).await?;
    if (200..300).contains(&resp.status) {
        Ok(true)
    } else {
        eprintln!(
            "HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
        Ok(false)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            listen,
            hostname,
            owner_key,
            service_key,
            tls,
            cert_dir,
            verbose,
            eventhub_name,
        } => serve(ServeOptions {
            listen,
            hostname,
            owner_key,
            service_key,
            tls,
            cert_dir,
            verbose,
            eventhub_name,
        })
        .await
        .map(|_| true),
        Command::Device {
            connection_string,
            endpoint,
            ca_file,
            action,
        } => device(connection_string, endpoint, ca_file, action).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("azure-iot-hub-emulator: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
