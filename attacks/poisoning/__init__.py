"""Poisoning attacks by malicious clients: data poisoning (what a client trains its upload on) and
model poisoning (the upload itself). They run inside training, declared by a matrix scenario."""
