//! The progress bar of the long-running commands (`pretrain`, `finetune`): a bar on rank 0
//! showing the window's chosen scalars, throughput and data wait, or plain lines with
//! `--plain` (and whenever stderr is not a terminal).

use m3ae_train::Window;

/// A [`m3ae_train::Progress`] with an `indicatif` bar or plain lines.
pub(crate) struct JobProgress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    /// (label, scalar name, decimals) of the window means shown (those the window has).
    fields: &'static [(&'static str, &'static str, usize)],
}

impl JobProgress {
    /// Shows `fields` (label, scalar name of the objective's report, decimals) of each window.
    pub(crate) fn new(plain: bool, fields: &'static [(&'static str, &'static str, usize)]) -> Self {
        Self {
            bar: None,
            plain,
            fields,
        }
    }
}

impl m3ae_train::Progress for JobProgress {
    fn start(&mut self, step: u64, total: u64) {
        if self.plain {
            return;
        }
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(step);
        self.bar = Some(b);
    }
    fn advance(&mut self, step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
        }
    }
    fn window(&mut self, w: &Window) {
        // only what the objective reports: an image-only MAE has no text loss to show as 0
        let values: Vec<String> = self
            .fields
            .iter()
            .filter(|(_, name, _)| w.scalars.contains_key(*name))
            .map(|&(label, name, decimals)| format!("{label} {:.*}", decimals, w.mean(name)))
            .collect();
        let msg = format!(
            "{} | {:.0} samples/s, data wait {:.0}%",
            values.join(" "),
            w.samples_per_s,
            100.0 * w.data_wait_fraction
        );
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => eprintln!("step {}/{} {msg}", w.step, w.total),
        }
    }
    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(b) => b.println(message),
            None => eprintln!("{message}"),
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
