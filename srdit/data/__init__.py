"""srdit.data"""
