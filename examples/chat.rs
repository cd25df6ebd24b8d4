//! Chat with Step3 in the terminal.
//!
//! ```text
//! cargo run --example chat                                   # the bundled demo checkpoint, offline
//! cargo run --release --example chat -- --prompt "Hello" --image cat.png
//! cargo run --release --features cuda --example chat -- --model stepfun-ai/step3-fp8 --device cuda
//! ```
//!
//! Interactive commands: `/image PATH` (attach to your next message), `/reset` (forget the
//! conversation), `/quit`.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use step3::{DType, Device, Event, GenerateOptions, Message, Step3};

/// Chat with Step3: multi-turn from stdin, or one answer with --prompt.
#[derive(Parser)]
#[command(name = "chat")]
struct Args {
    /// A Hugging Face repo id (stepfun-ai/step3, stepfun-ai/step3-fp8, owner/name@revision) or a
    /// model directory. Default: the bundled demo checkpoint (random weights).
    #[arg(long)]
    model: Option<String>,
    /// Answer this one message and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// Images for the first message (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// 0 = greedy (default: the model's generation_config.json, else 0.7).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Do not show the reasoning (it is shown dimmed otherwise).
    #[arg(long)]
    hide_reasoning: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Use only the local Hugging Face cache.
    #[arg(long)]
    offline: bool,
    /// Side of the local image crops, when the model needs a non-default one.
    #[arg(long)]
    crop_size: Option<usize>,
}

/// The dtype: as given, else f32 on the CPU (candle's fastest CPU dtype) and bf16 on CUDA.
fn dtype(s: Option<&str>, device: &Device) -> Result<DType> {
    Ok(match s {
        Some(s) => step3::parse_dtype(s)?,
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
    })
}

/// Prints events as they come: reasoning dimmed (or between <think> tags when not a terminal).
struct Printer {
    tty: bool,
    hide_reasoning: bool,
    in_reasoning: bool,
}

impl Printer {
    fn event(&mut self, e: &Event) {
        let mut out = std::io::stdout().lock();
        match e {
            Event::Reasoning(s) if !self.hide_reasoning => {
                if !self.in_reasoning {
                    let _ = write!(out, "{}", if self.tty { "\x1b[2m" } else { "<think>" });
                    self.in_reasoning = true;
                }
                let _ = write!(out, "{s}");
            }
            Event::Reasoning(_) => {}
            Event::Text(s) => {
                self.close_reasoning(&mut out);
                let _ = write!(out, "{s}");
            }
            Event::ToolCall(t) => {
                self.close_reasoning(&mut out);
                let _ = writeln!(out, "\n[tool call] {}({})", t.name, t.arguments_json());
            }
            Event::Done(stats) => {
                self.close_reasoning(&mut out);
                let _ = writeln!(out);
                eprintln!(
                    "[{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s]",
                    stats.prompt_tokens,
                    stats.generated_tokens,
                    stats.finish,
                    stats.prefill_tokens_per_sec(),
                    stats.decode_tokens_per_sec()
                );
            }
        }
        let _ = out.flush();
    }

    fn close_reasoning(&mut self, out: &mut impl Write) {
        if self.in_reasoning {
            let _ = write!(out, "{}", if self.tty { "\x1b[0m\n" } else { "</think>\n" });
            self.in_reasoning = false;
        }
    }
}

fn run(args: Args) -> Result<()> {
    let dev = step3::parse_device(&args.device)?;
    let dt = dtype(args.dtype.as_deref(), &dev)?;
    let demo = args.model.is_none();
    let source = args.model.clone().unwrap_or_else(|| step3::demo::demo_dir().to_string_lossy().into_owned());
    let opts = GenerateOptions {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        repetition_penalty: args.repetition_penalty,
        ..Default::default()
    };
    if let Some(t) = opts.temperature {
        if !(t.is_finite() && t >= 0.0) {
            bail!("--temperature must be a number >= 0, got {t}");
        }
    }
    if let Some(p) = opts.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    if let Some(p) = &args.prompt {
        if p.trim().is_empty() && args.images.is_empty() {
            bail!("--prompt is empty");
        }
    }
    if demo {
        eprintln!(
            "Using the bundled demo checkpoint ({}): Step3's architecture at toy size with random weights, \
             so its answers are noise.\nFor the real model: cargo run --release --features cuda --example chat -- \
             --model stepfun-ai/step3-fp8 --device cuda   (or --model DIR for a local copy)",
            step3::demo::demo_dir().display()
        );
    }
    let mut builder = Step3::from_pretrained(source.clone()).device(dev).dtype(dt);
    if args.offline {
        builder = builder.offline(true);
    }
    builder = builder.progress(true, Some(step3::LoadProgress(std::sync::Arc::new(|_, _| {}))));
    if let Some(c) = args.crop_size {
        builder = builder.crop_size(c);
    }
    let model = builder.build().with_context(|| format!("loading {source}"))?;
    let mut printer =
        Printer { tty: std::io::stdout().is_terminal(), hide_reasoning: args.hide_reasoning, in_reasoning: false };
    let mut history: Vec<Message> = args.system.iter().map(Message::system).collect();
    let mut pending_images = args.images.clone();

    let answer =
        |history: &mut Vec<Message>, text: String, images: Vec<PathBuf>, printer: &mut Printer| -> Result<()> {
            let mut msg = Message::user(text);
            msg.images = images;
            history.push(msg);
            // A different (reproducible) seed for every turn of the conversation.
            let turn = history.iter().filter(|m| m.role == step3::Role::User).count() as u64;
            let opts = GenerateOptions { seed: opts.seed.wrapping_add(turn.saturating_sub(1)), ..opts.clone() };
            let reply = model.generate_with(history, &opts, |e| {
                printer.event(e);
                ControlFlow::Continue(())
            });
            match reply {
                Ok(r) => {
                    history.push(Message::assistant(r.text));
                    Ok(())
                }
                Err(e) => {
                    history.pop();
                    Err(e.into())
                }
            }
        };

    if let Some(prompt) = args.prompt {
        return answer(&mut history, prompt, pending_images, &mut printer);
    }
    if demo {
        // Show a streamed answer straight away.
        let greeting = "Hello! Who are you?";
        eprintln!("> {greeting}");
        answer(&mut history, greeting.to_string(), std::mem::take(&mut pending_images), &mut printer)?;
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Type a message; /image PATH attaches an image to the next one, /reset forgets the conversation, /quit leaves.");
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line.split_once(' ').map_or((line, ""), |(c, r)| (c, r.trim())) {
            ("/quit" | "/exit", _) => break,
            ("/reset", _) => {
                history.retain(|m| m.role == step3::Role::System);
                pending_images.clear();
                eprintln!("(conversation cleared)");
            }
            ("/image", path) if !path.is_empty() => {
                if std::path::Path::new(path).is_file() {
                    pending_images.push(PathBuf::from(path));
                    eprintln!("(image {path} will go with your next message)");
                } else {
                    eprintln!("error: {path}: no such file");
                }
            }
            ("/image", _) => eprintln!("usage: /image PATH"),
            _ if line.is_empty() => {}
            _ => {
                if let Err(e) =
                    answer(&mut history, line.to_string(), std::mem::take(&mut pending_images), &mut printer)
                {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    step3::init_cpu_threads();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
