//! `instructd generate`: one prompt, or an interactive session on stdin,
//! through the same engine the server uses.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;
use inference::engine::{EngineConfig, Event, GenerateRequest};
use inference::sampling::SamplingParams;
use inference::tokenizer::ChatMessage;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (Hugging Face layout).
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    model: PathBuf,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (the template's default when absent).
    #[arg(long)]
    system: Option<String>,
    /// The prompt; without it, read prompts from stdin, one per line.
    prompt: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let engine = super::start_engine(&args.model, &args.dtype, EngineConfig::default())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage { role: "system".into(), content: system.clone() });
    }
    let one = |text: &str, history: &mut Vec<ChatMessage>| -> anyhow::Result<()> {
        let prompt = if args.chat {
            history.push(ChatMessage { role: "user".into(), content: text.to_string() });
            engine.tokenizer().apply_chat_template(history, true)?
        } else {
            text.to_string()
        };
        let mut request = GenerateRequest::new(engine.tokenizer().encode(&prompt, false)?, args.max_tokens);
        request.sampling =
            SamplingParams { temperature: args.temperature, top_p: args.top_p, seed: args.seed, ..Default::default() };
        request.stop = args.stop.clone().into();
        let reply = runtime.block_on(async {
            let mut generation = engine.submit(request, true)?;
            let mut reply = String::new();
            let mut out = std::io::stdout().lock();
            while let Some(event) = generation.next().await {
                match event {
                    Event::Token { text, .. } => {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                        reply.push_str(&text);
                    }
                    Event::Finished { .. } => break,
                    Event::Failed { message } => anyhow::bail!(message),
                    Event::Prompt { .. } => {}
                }
            }
            writeln!(out)?;
            anyhow::Ok(reply)
        })?;
        if args.chat {
            history.push(ChatMessage { role: "assistant".into(), content: reply });
        }
        Ok(())
    };
    match &args.prompt {
        Some(prompt) => one(prompt, &mut history),
        None => {
            eprintln!("reading prompts from stdin, one per line (Ctrl-D to end)");
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    one(&line, &mut history)?;
                }
            }
            Ok(())
        }
    }
}
