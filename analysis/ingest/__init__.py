"""Stage 00's domain: reading, checking and importing the input tables, and the conversations table."""
