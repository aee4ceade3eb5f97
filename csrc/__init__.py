"""Native sources (CUDA and C++), shipped as package data and compiled on first use."""
