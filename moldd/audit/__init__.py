"""moldd-audit: check, replay and export a moldd log without the daemon (read-only), and compare it with
the hosts. One module per subcommand; each returns data, ``moldd.cli.audit`` formats it."""

from moldd.audit.errors import EXIT_ERROR, EXIT_FOUND, EXIT_OK, AuditError

__all__ = ["EXIT_ERROR", "EXIT_FOUND", "EXIT_OK", "AuditError"]
