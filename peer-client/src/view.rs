//! The terminal view of `call`, `listen` and `room` when a person watches: one status line
//! redrawn in place and cut to the terminal's width, chat, notices and logs printed above it,
//! and — when stdin is the terminal too — the line being typed kept below the status line,
//! intact across every redraw.
//!
//! ```text
//! connected to bob via direct in 41.2 ms
//! bob: hello
//! you: hi bob
//! [bob] path direct  rtt 0.4 ms  12 s  sending 1032 kbit/s  audio 32 kbit/s loss 0 …
//! > half-typed li
//! ```
//!
//! The view draws on stdout when that is a terminal (else on stderr when that is one); with
//! `--json`, or when neither is a terminal, it is off and output is exactly as without it.
//! Typing uses the terminal in raw mode (crossterm): Enter sends the line, Backspace and Ctrl-U
//! edit it, Ctrl-C — and Ctrl-D on an empty line — interrupt as SIGINT does (the process raises
//! it: a call hangs up, a listener waiting or a room stops), and the keyboard stays live. The
//! terminal is restored by [`finish`], also on a panic. Text from elsewhere (a peer's chat, a
//! hang-up reason) is shown with its control characters replaced, so it cannot drive the
//! terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, queue, style::Print, terminal};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use unicode_width::UnicodeWidthChar;

/// Which stream the view draws on.
#[derive(Debug, Clone, Copy)]
enum Target {
    Stdout,
    Stderr,
}

#[derive(Debug)]
struct State {
    target: Target,
    status: String,
    /// The line being typed; `Some` while keys are read in raw mode.
    input: Option<String>,
    /// What a typed line is shown as when sent ("you", or "answer" while a question waits).
    echo: &'static str,
    /// The bottom region's rows on the screen now (status, input), each as the columns drawn:
    /// after the terminal narrows, a row may take several.
    drawn: Vec<usize>,
}

static VIEW: Mutex<Option<State>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut State) -> T) -> Option<T> {
    let mut view = VIEW.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    view.as_mut().map(f)
}

/// Turns the view on when a person watches: not with `--json`; on stdout when it is a terminal
/// and carries no received media, else on stderr when that is a terminal.
pub fn init(json: bool, media_on_stdout: bool) {
    if json {
        return;
    }
    let target = if !media_on_stdout && foreground(&std::io::stdout()) {
        Target::Stdout
    } else if foreground(&std::io::stderr()) {
        Target::Stderr
    } else {
        return;
    };
    *VIEW.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(State {
        target,
        status: String::new(),
        input: None,
        echo: "you",
        drawn: Vec::new(),
    });
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        finish_after_panic();
        previous(info);
    }));
}

/// Whether `fd` is a terminal this process has in the foreground (a process started with `&`
/// shares the terminal but must neither draw on it nor read keys from it).
pub fn foreground(fd: &(impl IsTerminal + std::os::fd::AsFd)) -> bool {
    fd.is_terminal() && rustix::termios::tcgetpgrp(fd).is_ok_and(|group| group == rustix::process::getpgrp())
}

/// Prints `text` (one or more lines) above the status line.
pub fn print(text: &str) -> bool {
    with(|s| {
        let mut out = Vec::new();
        s.clear_region(&mut out);
        for line in text.lines() {
            let _ = queue!(out, Print(printable(line)), Print("\r\n"));
        }
        s.draw_region(&mut out);
        s.write(&out);
    })
    .is_some()
}

/// Typed lines are shown as answers (`answer: y`) while `asking`, as chat (`you: …`) otherwise.
pub fn asking(asking: bool) {
    with(|s| s.echo = if asking { "answer" } else { "you" });
}

/// Replaces the status line.
pub fn status(text: &str) {
    with(|s| {
        if s.status == text && !s.drawn.is_empty() {
            return;
        }
        s.status = text.to_owned();
        s.redraw();
    });
}

/// Clears the bottom region and gives the terminal back (cooked mode); the view is off after.
/// Waits for a key or print in progress on another thread to finish first.
pub fn finish() {
    let view = VIEW.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    restore(view);
}

/// [`finish`] from the panic hook: the panicking thread may hold the view's lock, so it is
/// only tried (raw mode is left off in any case).
fn finish_after_panic() {
    match VIEW.try_lock() {
        Ok(view) => restore(view),
        Err(_) => {
            let _ = terminal::disable_raw_mode();
        }
    }
}

fn restore(mut view: std::sync::MutexGuard<'_, Option<State>>) {
    if let Some(mut s) = view.take() {
        let mut out = Vec::new();
        s.clear_region(&mut out);
        s.write(&out);
        if s.input.is_some() {
            let _ = terminal::disable_raw_mode();
        }
    }
}

/// Reads keys from the terminal when the view is on and stdin is the terminal: returns the
/// lines typed (the channel closes on Ctrl-D on an empty line). `None` when keys are not read
/// here (the caller reads stdin as lines).
pub fn read_lines() -> Option<mpsc::Receiver<String>> {
    if !foreground(&std::io::stdin()) {
        return None;
    }
    with(|s| {
        terminal::enable_raw_mode().ok()?;
        s.input = Some(String::new());
        s.redraw();
        Some(())
    })
    .flatten()?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut events = EventStream::new();
        while let Some(Ok(event)) = events.next().await {
            match event {
                Event::Key(key) if key.kind != KeyEventKind::Release => match on_key(key) {
                    Key::Edited => {}
                    Key::Line(line) => {
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    Key::End => return,
                },
                Event::Resize(..) => {
                    with(State::redraw);
                }
                _ => {}
            }
        }
    });
    Some(rx)
}

enum Key {
    Edited,
    Line(String),
    End,
}

fn on_key(key: KeyEvent) -> Key {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    let outcome = with(|s| {
        let input = s.input.get_or_insert_with(String::new);
        match key.code {
            KeyCode::Char('c') if ctrl => {
                interrupt();
                Key::Edited
            }
            KeyCode::Char('d') if ctrl && input.is_empty() => {
                interrupt();
                Key::Edited
            }
            KeyCode::Char('u') if ctrl => {
                input.clear();
                Key::Edited
            }
            KeyCode::Char('l') if ctrl => Key::Edited,
            KeyCode::Char(c) if !ctrl => {
                input.push(c);
                Key::Edited
            }
            KeyCode::Backspace => {
                input.pop();
                Key::Edited
            }
            KeyCode::Enter => Key::Line(std::mem::take(input)),
            _ => Key::Edited,
        }
    });
    match outcome {
        Some(Key::Line(line)) => {
            let echo = with(|s| s.echo).unwrap_or("you");
            print(&format!("{echo}: {line}"));
            Key::Line(line)
        }
        Some(k) => {
            with(State::redraw);
            k
        }
        None => Key::End,
    }
}

/// Ctrl-C in raw mode is a key, not a signal: raise SIGINT so it does what it does anywhere
/// else (hang up, stop listening). SIGTERM and SIGHUP are turned into it too.
pub fn interrupt() {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::INT);
}

impl State {
    fn width(&self) -> usize {
        terminal::size().map(|(w, _)| usize::from(w)).unwrap_or(80).max(10)
    }

    fn write(&self, bytes: &[u8]) {
        let _ = match self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Target::Stderr => {
                let mut out = std::io::stderr().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
        };
    }

    /// Moves to the first column of the region's first row and clears to the end of the screen.
    /// A row drawn wider than the terminal is now (it narrowed) takes several rows.
    fn clear_region(&mut self, out: &mut Vec<u8>) {
        let width = self.width();
        let rows: usize = self.drawn.iter().map(|cols| cols.div_ceil(width).max(1)).sum();
        let _ = queue!(out, cursor::MoveToColumn(0));
        if rows > 1 {
            let _ = queue!(out, cursor::MoveUp(u16::try_from(rows - 1).unwrap_or(u16::MAX)));
        }
        let _ = queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown));
        self.drawn.clear();
    }

    /// Draws the region from the cursor (at the first column of a cleared row). Each row stays
    /// one column short of the width, so the terminal never wraps it.
    fn draw_region(&mut self, out: &mut Vec<u8>) {
        let room = self.width() - 1;
        let mut rows = Vec::new();
        if !self.status.is_empty() {
            let shown = fit_start(&self.status, room);
            let _ = queue!(out, Print(shown));
            rows.push(columns(shown));
        }
        if let Some(input) = &self.input {
            if !rows.is_empty() {
                let _ = queue!(out, Print("\r\n"));
            }
            let shown = fit_end(input, room.saturating_sub(2));
            let _ = queue!(out, Print("> "), Print(shown));
            rows.push(2 + columns(shown));
        }
        self.drawn = rows;
    }

    fn redraw(&mut self) {
        let mut out = Vec::new();
        self.clear_region(&mut out);
        self.draw_region(&mut out);
        self.write(&out);
    }
}

/// The columns `text` takes.
fn columns(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// `text` with its control characters (escape sequences, carriage returns, bells) replaced by
/// U+FFFD, so text from a peer cannot move the cursor, clear the screen or retitle the window.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(|c| c.is_control() && c != '\t') {
        text.chars()
            .map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// The start of `text` that fits in `cols` columns.
pub fn fit_start(text: &str, cols: usize) -> &str {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += c.width().unwrap_or(0);
        if used > cols {
            return &text[..i];
        }
    }
    text
}

/// The end of `text` that fits in `cols` columns (the cursor stays at the end of a long line).
fn fit_end(text: &str, cols: usize) -> &str {
    let mut used = 0;
    for (i, c) in text.char_indices().rev() {
        used += c.width().unwrap_or(0);
        if used > cols {
            return &text[i + c.len_utf8()..];
        }
    }
    text
}

/// Where logs go: above the status line while the view is on, else stderr.
#[derive(Debug, Default)]
pub struct LogWriter {
    buf: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        if !print(text.trim_end()) {
            std::io::stderr().write_all(text.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_by_columns_not_bytes() {
        assert_eq!(fit_start("path direct  rtt 0.4 ms", 11), "path direct");
        assert_eq!(fit_start("short", 80), "short");
        // Wide characters take two columns each; a cut never splits a character.
        assert_eq!(fit_start("ab漢字cd", 5), "ab漢");
        assert_eq!(fit_start("ab漢字cd", 4), "ab漢");
        assert_eq!(fit_start("ab漢字cd", 3), "ab");
        assert_eq!(fit_end("a long line being typed", 10), "eing typed");
        assert_eq!(fit_end("漢字x", 3), "字x");
        assert_eq!(fit_end("", 3), "");
    }

    #[test]
    fn control_characters_from_elsewhere_cannot_drive_the_terminal() {
        assert_eq!(printable("hello"), "hello");
        assert_eq!(printable("a\x1b[2Jb\x07c\rd\te"), "a\u{fffd}[2Jb\u{fffd}c\u{fffd}d\te");
        assert_eq!(printable("\x1b]0;pwned\x07"), "\u{fffd}]0;pwned\u{fffd}");
    }
}
