"""What every process shares: one settings object, one logging setup, content hashes."""
