"""Project code shared by training and the desktop app."""
