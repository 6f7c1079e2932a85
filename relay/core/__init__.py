"""What every process shares: settings, logs, metrics, crypto, errors, strict JSON, rate limits."""
