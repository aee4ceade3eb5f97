"""memk.memorize: GPT-2, random data, training to saturation, exact bits, capacity."""
