//! collector.toml(5): the configuration man page, written from `collector::options`, the
//! same table the ceilometer.conf importer and its unit test keep in step with `Config`.

use collector::options::{OptionDoc, OPTIONS, SECTIONS};

/// Escape text for roff: backslashes, and a leading `.` or `'` that would read as a request.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with(['.', '\'']) {
        format!("\\&{s}")
    } else {
        s
    }
}

fn option(o: &OptionDoc) -> String {
    let ceilometer = if o.ceilometer.is_empty() {
        "none (collector only)".to_string()
    } else {
        o.ceilometer.to_string()
    };
    format!(
        ".TP\n\\fB{}\\fR = \\fI{}\\fR\n{}\n.br\nceilometer.conf: {}\n",
        esc(o.key),
        esc(o.default),
        esc(o.help),
        esc(&ceilometer)
    )
}

/// The whole page, in roff.
pub fn config_man_page() -> String {
    let mut p = format!(
        ".TH COLLECTOR.TOML 5 \"\" \"collector {}\" \"File Formats\"\n",
        env!("CARGO_PKG_VERSION")
    );
    p.push_str(
        ".SH NAME\ncollector.toml \\- configuration of the collector metering\\-sample daemon\n\
         .SH SYNOPSIS\n/etc/collector/collector.toml (Debian package), or any file given to \
         \\fBcollector \\-\\-config\\fR\n\
         .SH DESCRIPTION\nA TOML file of the sections below. Every option is optional: an absent \
         one takes the default shown after its name, and \\fBcollector\\fR without \
         \\fB\\-\\-config\\fR runs on these defaults alone (the embedded mode: SQLite and the \
         control socket under ./data, loopback ports). Unknown keys and wrong types are errors \
         that name the key and the line; \\fBcollector \\-\\-check\\-config \\-\\-config FILE\\fR \
         validates a file and prints the effective configuration with secrets masked. \
         HUP or \\fBcollectorctl reload\\fR applies a changed file without losing samples.\n\
         .PP\nOption names follow ceilometer's: each option lists the \\fBceilometer.conf\\fR \
         option it corresponds to. \\fBcollector \\-\\-import\\-ceilometer\\-conf \
         /etc/ceilometer/ceilometer.conf\\fR prints an equivalent collector.toml, with a comment \
         for each option it could not carry over.\n",
    );
    for (section, about) in SECTIONS {
        p.push_str(&format!(".SH [{}]\n{}\n", esc(section), esc(about)));
        for o in OPTIONS.iter().filter(|o| o.section == *section) {
            p.push_str(&option(o));
        }
    }
    p.push_str(
        ".SH PACKAGED DEFAULTS\nThe Debian package's /etc/collector/collector.toml (a conffile) \
         differs from the embedded defaults in its paths: \\fBpidfile\\fR \
         /run/collector/collector.pid, \\fBcontrol_socket\\fR /run/collector/control.sock, \
         \\fBlog_file\\fR /var/log/collector/collector.log, \\fBuser\\fR and \\fBgroup\\fR \
         collector, \\fBconnection\\fR sqlite:////var/lib/collector/collector.db, \
         \\fBfile_path\\fR /var/log/collector/samples.log.\n\
         .SH EXAMPLE\n.nf\n[collector]\nudp_address = \"0.0.0.0\"\nbatch_size = 1000\n\n\
         [publisher]\ntelemetry_secret = \"shared with ceilometer\"\n\n[database]\n\
         connection = \"postgresql://collector:secret@db:5432/metering\"\n.fi\n\
         .SH SEE ALSO\n\\fBcollector\\fR(8), \\fBcollectorctl\\fR(8)\n",
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_documents_every_option_with_default_and_ceilometer_name() {
        let page = config_man_page();
        for o in OPTIONS {
            assert!(
                page.contains(&format!(
                    "\\fB{}\\fR = \\fI{}\\fR",
                    esc(o.key),
                    esc(o.default)
                )),
                "{} missing",
                o.key
            );
            if !o.ceilometer.is_empty() {
                assert!(page.contains(&esc(o.ceilometer)), "{}", o.ceilometer);
            }
        }
        // No line starts with a character roff would take as a request by accident.
        for line in page.lines() {
            assert!(!line.starts_with('\''), "{line}");
        }
    }
}
