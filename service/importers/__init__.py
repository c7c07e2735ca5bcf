"""Parsers of other tools' records (ml-goodput-measurement), to what the store keeps."""
