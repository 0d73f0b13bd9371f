"""Analysis engine: pure computation, no I/O beyond the bundled model tables."""

#: Version of the analysis method. A study is analysed once per engine version; reports derive their
#: UIDs from it, so a resend never makes a duplicate and a new method makes a new report.
ENGINE_VERSION = "0.1.0"
