//! Chat with Step3 in the terminal.
//!
//! ```text
//! cargo run --example chat                                   # the bundled demo checkpoint, offline
//! cargo run --release --example chat -- --prompt "Hello" --image cat.png
//! cargo run --release --features cuda --example chat -- --model stepfun-ai/step3-fp8 --device cuda
//! ```
//!
//! Interactive commands: `/image PATH` (attach to your next message), `/reset` (forget the
//! conversation), `/help`, `/quit`. Piped input is echoed on stderr, so a transcript reads in order.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use step3::cli::{ModelArgs, SamplingArgs};
use step3::{Event, GenerateOptions, Message};

/// Chat with Step3: multi-turn from stdin, or one answer with --prompt.
#[derive(Parser)]
#[command(name = "chat")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Answer this one message and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// Images for the first message (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Do not show the reasoning (it is shown dimmed otherwise).
    #[arg(long)]
    hide_reasoning: bool,
}

const HELP: &str = "/image PATH attaches an image to your next message, /reset forgets the conversation, \
                    /help shows this, /quit leaves.";

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
                eprintln!("[{}]", step3::cli::describe_stats(stats));
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
    args.sampling.validate()?;
    let opts = args.sampling.options();
    if let Some(p) = &args.prompt {
        if p.trim().is_empty() && args.images.is_empty() {
            bail!("--prompt is empty");
        }
    }
    let model = args.model.load()?;
    let mut printer =
        Printer { tty: std::io::stdout().is_terminal(), hide_reasoning: args.hide_reasoning, in_reasoning: false };
    let mut history: Vec<Message> = args.system.iter().map(Message::system).collect();
    let mut pending_images = args.images.clone();

    let answer =
        |history: &mut Vec<Message>, text: String, images: Vec<PathBuf>, printer: &mut Printer| -> Result<()> {
            let mut msg = Message::user(text);
            msg.images = images.into_iter().map(step3::ImageSource::File).collect();
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
    let interactive = std::io::stdin().is_terminal();
    eprintln!("Type a message; {HELP}");
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
        if !interactive && !line.is_empty() {
            // Piped input: show what is being answered.
            eprintln!("> {line}");
        }
        match line.split_once(' ').map_or((line, ""), |(c, r)| (c, r.trim())) {
            ("/quit" | "/exit", _) => break,
            ("/help", _) => eprintln!("{HELP}"),
            ("/reset", _) => {
                history.retain(|m| m.role == step3::Role::System);
                pending_images.clear();
                eprintln!("(conversation cleared)");
            }
            ("/image", path) if !path.is_empty() => {
                // Decoded now, so that a file that is no image is said at once, not after the
                // next message.
                let limit = step3::vision::PreprocessConfig::default().max_pixels;
                match step3::vision::load_image(std::path::Path::new(path), limit) {
                    Ok(_) => {
                        pending_images.push(PathBuf::from(path));
                        eprintln!("(image {path} will go with your next message)");
                    }
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            ("/image", _) => eprintln!("usage: /image PATH"),
            (cmd, _) if cmd.starts_with('/') => eprintln!("unknown command {cmd}, try /help"),
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
    step3::init_cpu();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
