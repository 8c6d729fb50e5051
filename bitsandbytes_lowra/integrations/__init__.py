"""Integrations with transformers (`integrations.transformers`: LowRAConfig and the "lowra" quantizer) and peft."""
