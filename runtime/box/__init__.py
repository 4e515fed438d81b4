"""The box as the command line manages it (install, rollback, flash, status, check): never run inside the line."""
