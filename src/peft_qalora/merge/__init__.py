"""Adapter updates -> integer zeros and fp16 scales: the strategies (zeros), calibration, reading adapter folders, and the file-to-file driver."""
