"""What the runtime process runs on, whichever room uses it: its metrics, its logs, the systemd watchdog, and the
disk the outbox lives on (the verdicts' reserve, the one-runtime-per-line lock)."""
