"""ATR-format data: synthetic generator, ATR-OS builder, TFRecord episodes."""
