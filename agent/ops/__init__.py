"""Operations: diagnostics, telemetry, metrics, the local API."""
