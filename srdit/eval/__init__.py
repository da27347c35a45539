"""srdit.eval"""
