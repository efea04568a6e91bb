"""The loop that drives everything, on the engine's top floor: the engine, the step (executor), admission
and the reports. It imports the floors below it; nothing below imports it."""
